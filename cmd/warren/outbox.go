package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/outbox"
)

func newOutboxCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "outbox",
		Short: "Inspect the outbox or append an event from the shell",
	}
	cmd.AddCommand(newOutboxStatusCmd(), newOutboxListCmd(), newOutboxAppendCmd(), newOutboxPruneCmd())
	return cmd
}

func addFormatFlag(cmd *cobra.Command) {
	cmd.Flags().String("format", "table", "output format: table or json")
}

func outputFormat(cmd *cobra.Command) (string, error) {
	f, _ := cmd.Flags().GetString("format")
	if f != "table" && f != "json" {
		return "", fmt.Errorf("flag --format: %q is not table or json", f)
	}
	return f, nil
}

// loadConfigAndFormat reads the settings and the --format flag, the
// preamble of every command that prints a table or JSON.
func loadConfigAndFormat(cmd *cobra.Command) (Config, string, error) {
	format, err := outputFormat(cmd)
	if err != nil {
		return Config{}, "", err
	}
	cfg, err := loadConfig(cmd)
	return cfg, format, err
}

// loadConfigFormatAndDB is loadConfigAndFormat, then opens the migrated
// database; the caller closes it.
func loadConfigFormatAndDB(cmd *cobra.Command) (Config, string, *dbHandle, error) {
	cfg, format, err := loadConfigAndFormat(cmd)
	if err != nil {
		return cfg, format, nil, err
	}
	db, err := openDB(cmd.Context(), cfg)
	return cfg, format, db, err
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newOutboxStatusCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Backlog and oldest unpublished event per producer",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, format, db, err := loadConfigFormatAndDB(cmd)
			if err != nil {
				return err
			}
			defer db.Close()
			st, err := outbox.Status(cmd.Context(), db)
			if err != nil {
				return err
			}
			if format == "json" {
				if st == nil {
					st = []outbox.ProducerStatus{}
				}
				return writeJSON(cmd.OutOrStdout(), st)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PRODUCER\tBACKLOG\tOLDEST UNPUBLISHED\tPUBLISHED (KEPT)\tLAST PUBLISHED")
			for _, s := range st {
				fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\n", s.Producer, s.Backlog, age(s.OldestUnpublished), s.Published, age(s.LastPublished))
			}
			if len(st) == 0 {
				fmt.Fprintln(tw, "(empty outbox)\t\t\t\t")
			}
			return tw.Flush()
		},
	}
	addFlags(cmd, "db")
	addFormatFlag(cmd)
	return cmd
}

func age(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return fmt.Sprintf("%s ago", time.Since(t).Round(time.Millisecond))
}

type outboxRowJSON struct {
	Seq              int64             `json:"seq"`
	EventID          string            `json:"event_id"`
	Producer         string            `json:"producer"`
	EventType        string            `json:"event_type"`
	AggregateType    string            `json:"aggregate_type,omitempty"`
	AggregateID      string            `json:"aggregate_id,omitempty"`
	AggregateVersion *int64            `json:"aggregate_version,omitempty"`
	ContentType      string            `json:"content_type"`
	Headers          map[string]string `json:"headers"`
	Payload          any               `json:"payload"`
	CreatedAt        time.Time         `json:"created_at"`
	PublishedAt      *time.Time        `json:"published_at"`
	Error            string            `json:"error,omitempty"`
}

func newOutboxListCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "list",
		Short: "Recent events, newest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, format, err := loadConfigAndFormat(cmd)
			if err != nil {
				return err
			}
			producer, _ := cmd.Flags().GetString("producer")
			unpublished, _ := cmd.Flags().GetBool("unpublished")
			limit, _ := cmd.Flags().GetInt("limit")
			before, _ := cmd.Flags().GetInt64("before")
			if limit < 1 {
				return fmt.Errorf("flag --limit: must be at least 1")
			}
			db, err := openDB(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			defer db.Close()
			rows, err := outbox.List(cmd.Context(), db, outbox.ListFilter{Producer: producer, Unpublished: unpublished, Limit: limit, BeforeSeq: before})
			if err != nil {
				return err
			}
			if format == "json" {
				out := make([]outboxRowJSON, 0, len(rows))
				for _, r := range rows {
					j := outboxRowJSON{Seq: r.Seq, EventID: r.EventID, Producer: r.Producer, EventType: r.EventType,
						AggregateType: r.AggregateType, AggregateID: r.AggregateID, AggregateVersion: r.AggregateVersion,
						ContentType: r.ContentType, Headers: r.Headers, Payload: payloadJSON(r.Payload), CreatedAt: r.CreatedAt, PublishedAt: r.PublishedAt}
					if r.Err != nil {
						j.Error = r.Err.Error()
					}
					out = append(out, j)
				}
				return writeJSON(cmd.OutOrStdout(), out)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SEQ\tEVENT ID\tPRODUCER\tTYPE\tAGGREGATE\tCREATED\tPUBLISHED")
			for _, r := range rows {
				pub := "no"
				if r.PublishedAt != nil {
					pub = r.PublishedAt.Format(time.RFC3339)
				}
				if r.Err != nil {
					pub = "invalid: " + r.Err.Error()
				}
				agg := strings.Trim(r.AggregateType+"/"+r.AggregateID, "/")
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Seq, r.EventID, r.Producer, r.EventType, agg, r.CreatedAt.Format(time.RFC3339), pub)
			}
			if len(rows) == limit {
				fmt.Fprintf(tw, "(more: --before %d)\t\t\t\t\t\t\n", rows[len(rows)-1].Seq)
			}
			return tw.Flush()
		},
	}
	addFlags(cmd, "db")
	addFormatFlag(cmd)
	cmd.Flags().String("producer", "", "only this producer's events")
	cmd.Flags().Bool("unpublished", false, "only events not yet published")
	cmd.Flags().Int("limit", 20, "how many events")
	cmd.Flags().Int64("before", 0, "only events with a seq below this (the next page)")
	return cmd
}

func newOutboxAppendCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "append --producer NAME --type TYPE [PAYLOAD]",
		Short: "Append one event from the shell (payload from the argument or stdin)",
		Long: `append appends one event to the outbox in its own transaction; the relay
publishes it. The payload is the argument, or standard input when there is no
argument or it is "-".

  warren outbox append --producer crm --type company.updated \
      --aggregate company:42 '{"name":"Acme"}'`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			producer, _ := cmd.Flags().GetString("producer")
			if producer == "" {
				producer = cfg.App
			}
			typ, _ := cmd.Flags().GetString("type")
			agg, _ := cmd.Flags().GetString("aggregate")
			version, _ := cmd.Flags().GetInt64("aggregate-version")
			ctype, _ := cmd.Flags().GetString("content-type")
			corr, _ := cmd.Flags().GetString("correlation-id")
			id, _ := cmd.Flags().GetString("id")
			hdrs, _ := cmd.Flags().GetStringToString("header")
			var payload []byte
			if len(args) == 1 && args[0] != "-" {
				payload = []byte(args[0])
			} else {
				payload, err = io.ReadAll(io.LimitReader(cmd.InOrStdin(), int64(cfg.MaxPayloadBytes)+1))
				if err != nil {
					return fmt.Errorf("read payload from stdin: %w", err)
				}
			}
			ev := outbox.Event{ID: id, Producer: producer, Type: typ, ContentType: ctype, CorrelationID: corr, Headers: hdrs, Payload: payload}
			if agg != "" {
				at, aid, ok := strings.Cut(agg, ":")
				if !ok || at == "" || aid == "" {
					return fmt.Errorf("flag --aggregate: %q is not TYPE:ID (e.g. company:42)", agg)
				}
				ev.AggregateType, ev.AggregateID = at, aid
			}
			if cmd.Flags().Changed("aggregate-version") {
				ev.AggregateVersion = outbox.Version(version)
			}
			db, err := openDB(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			defer db.Close()
			ob, err := outbox.New(outbox.Config{MaxPayloadBytes: cfg.MaxPayloadBytes})
			if err != nil {
				return err
			}
			ids, err := ob.AppendDB(cmd.Context(), db.DB, ev)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), ids[0])
			return nil
		},
	}
	addFlags(cmd, "db", "max-payload-bytes")
	cmd.Flags().String("producer", "", "the producing application (default: --app / WARREN_APP)")
	cmd.Flags().String("type", "", "event type, e.g. company.updated (required)")
	cmd.Flags().String("aggregate", "", "aggregate as TYPE:ID, e.g. company:42")
	cmd.Flags().Int64("aggregate-version", 0, "aggregate version")
	cmd.Flags().String("content-type", "application/json", "payload content type")
	cmd.Flags().String("correlation-id", "", "correlation id")
	cmd.Flags().String("id", "", "event id (default: a new UUIDv7)")
	cmd.Flags().StringToString("header", nil, "header NAME=VALUE (repeatable)")
	addFlags(cmd, "app")
	return cmd
}

// payloadJSON shows a JSON payload as JSON and anything else as a string.
func payloadJSON(p []byte) any {
	if json.Valid(p) {
		return json.RawMessage(p)
	}
	return string(p)
}
