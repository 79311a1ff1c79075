package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/inbox"
)

func newInboxCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "inbox",
		Short: "What this service received: list, show one message, stats",
		Long: `inbox answers "what did this service receive, when, from whom, with how
many attempts and which error" from warren_inbox.

  warren inbox list --app billing --status poisoned --since 24h
  warren inbox show --app billing 0190c6f4-…
  warren inbox stats --app billing --format json
  warren inbox prune --app billing --dry-run`,
	}
	cmd.AddCommand(newInboxListCmd(), newInboxShowCmd(), newInboxStatsCmd(), newInboxPruneCmd())
	return cmd
}

// parseSince reads a time: RFC 3339, a date, or a duration back from now.
func parseSince(flag, v string) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(v); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("flag --%s: %s is negative", flag, v)
		}
		return time.Now().Add(-d), nil
	}
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, v, time.UTC); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("flag --%s: %q is neither a time (2026-11-22T10:00:00Z, 2026-11-22) nor a duration back from now (24h)", flag, v)
}

type entryJSON struct {
	Consumer         string            `json:"consumer"`
	MessageID        string            `json:"message_id"`
	Producer         string            `json:"producer"`
	Exchange         string            `json:"exchange"`
	RoutingKey       string            `json:"routing_key"`
	EventType        string            `json:"event_type"`
	AggregateType    string            `json:"aggregate_type,omitempty"`
	AggregateID      string            `json:"aggregate_id,omitempty"`
	AggregateVersion *int64            `json:"aggregate_version,omitempty"`
	Status           string            `json:"status"`
	Attempts         int               `json:"attempts"`
	Duplicates       int               `json:"duplicates"`
	LastError        string            `json:"last_error,omitempty"`
	FirstReceivedAt  time.Time         `json:"first_received_at"`
	ProcessedAt      *time.Time        `json:"processed_at"`
	Headers          map[string]string `json:"headers,omitempty"`
}

func toEntryJSON(e inbox.Entry) entryJSON {
	j := entryJSON{Consumer: e.Consumer, MessageID: e.MessageID, Producer: e.Producer, Exchange: e.Exchange, RoutingKey: e.RoutingKey,
		EventType: e.EventType, AggregateType: e.AggregateType, AggregateID: e.AggregateID, AggregateVersion: e.AggregateVersion,
		Status: string(e.Status), Attempts: e.Attempts, Duplicates: e.Duplicates, LastError: e.LastError, FirstReceivedAt: e.ReceivedAt, Headers: e.Headers}
	if !e.ProcessedAt.IsZero() {
		t := e.ProcessedAt
		j.ProcessedAt = &t
	}
	return j
}

func oneLineText(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		return s[:n-1] + "…"
	}
	return s
}

func newInboxListCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List received messages, newest first, with filters",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, format, err := loadConfigAndFormat(cmd)
			if err != nil {
				return err
			}
			f := inbox.Filter{Consumer: cfg.App}
			status, _ := cmd.Flags().GetString("status")
			switch inbox.Status(status) {
			case "", inbox.StatusProcessed, inbox.StatusRetrying, inbox.StatusPoisoned:
				f.Status = inbox.Status(status)
			default:
				return fmt.Errorf("flag --status: %q is not processed, retrying or poisoned", status)
			}
			f.EventType, _ = cmd.Flags().GetString("type")
			if agg, _ := cmd.Flags().GetString("aggregate"); agg != "" {
				at, aid, ok := strings.Cut(agg, ":")
				f.AggregateType = at
				if ok {
					f.AggregateID = aid
				}
			}
			since, _ := cmd.Flags().GetString("since")
			until, _ := cmd.Flags().GetString("until")
			if f.Since, err = parseSince("since", since); err != nil {
				return err
			}
			if f.Until, err = parseSince("until", until); err != nil {
				return err
			}
			f.Limit, _ = cmd.Flags().GetInt("limit")
			if f.Limit < 1 || f.Limit > inbox.MaxListLimit {
				return fmt.Errorf("flag --limit: must be from 1 to %d", inbox.MaxListLimit)
			}
			f.Cursor, _ = cmd.Flags().GetString("cursor")
			f.Oldest, _ = cmd.Flags().GetBool("oldest")
			db, err := openDB(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			defer db.Close()
			page, err := inbox.List(cmd.Context(), db, f)
			if errors.Is(err, inbox.ErrBadCursor) {
				return fmt.Errorf("flag --cursor: not a cursor printed by warren inbox list")
			}
			if err != nil {
				return err
			}
			if format == "json" {
				out := struct {
					Entries []entryJSON `json:"entries"`
					Next    string      `json:"next_cursor,omitempty"`
				}{Entries: []entryJSON{}, Next: page.Next}
				for _, e := range page.Entries {
					out.Entries = append(out.Entries, toEntryJSON(e))
				}
				return writeJSON(cmd.OutOrStdout(), out)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "RECEIVED\tCONSUMER\tMESSAGE ID\tFROM\tTYPE\tAGGREGATE\tSTATUS\tATTEMPTS\tDUPS\tLAST ERROR")
			for _, e := range page.Entries {
				agg := strings.Trim(e.AggregateType+":"+e.AggregateID, ":")
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", e.ReceivedAt.Format("2006-01-02 15:04:05.000"), e.Consumer, e.MessageID,
					e.Producer, e.EventType, agg, e.Status, e.Attempts, e.Duplicates, oneLineText(e.LastError, 60))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if len(page.Entries) == 0 {
				fmt.Fprintln(cmd.OutOrStdout(), "(no messages match)")
			}
			if page.Next != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "more: --cursor %s\n", page.Next)
			}
			return nil
		},
	}
	addFlags(cmd, "db", "app")
	addFormatFlag(cmd)
	cmd.Flags().String("status", "", "processed, retrying or poisoned")
	cmd.Flags().String("type", "", "event type")
	cmd.Flags().String("aggregate", "", "aggregate TYPE or TYPE:ID")
	cmd.Flags().String("since", "", "received at or after: a time (2026-11-22T10:00:00Z) or a duration back (24h)")
	cmd.Flags().String("until", "", "received before: a time or a duration back")
	cmd.Flags().Int("limit", 50, "messages per page")
	cmd.Flags().String("cursor", "", "continue after a previous page (printed as 'more: --cursor …')")
	cmd.Flags().Bool("oldest", false, "oldest first")
	return cmd
}

func newInboxShowCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "show MESSAGE_ID",
		Short: "Show one received message: the delivery as JSON and its audit trail",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			format, _ := cmd.Flags().GetString("format")
			if format != "json" && format != "table" {
				return fmt.Errorf("flag --format: %q is not table or json", format)
			}
			db, err := openDB(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			defer db.Close()
			e, err := inbox.Show(cmd.Context(), db, cfg.App, args[0])
			if errors.Is(err, inbox.ErrNotFound) {
				where := "any consumer"
				if cfg.App != "" {
					where = "consumer " + cfg.App
				}
				return fmt.Errorf("no message %s in the inbox of %s", args[0], where)
			}
			if err != nil {
				return err
			}
			delivery := inbox.JSON(&e.Delivery, cfg.Binary)
			out := struct {
				Audit    entryJSON          `json:"audit"`
				Delivery inbox.DeliveryJSON `json:"delivery"`
			}{toEntryJSON(e), delivery}
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), out)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			a := out.Audit
			for _, kv := range [][2]string{
				{"consumer", a.Consumer}, {"message id", a.MessageID}, {"from", a.Producer}, {"exchange", a.Exchange},
				{"routing key", a.RoutingKey}, {"type", a.EventType}, {"aggregate", strings.Trim(a.AggregateType+":"+a.AggregateID, ":")},
				{"status", a.Status}, {"attempts", fmt.Sprint(a.Attempts)}, {"duplicates", fmt.Sprint(a.Duplicates)},
				{"last error", a.LastError}, {"first received", a.FirstReceivedAt.Format(time.RFC3339Nano)},
			} {
				fmt.Fprintf(tw, "%s:\t%s\n", kv[0], kv[1])
			}
			if a.ProcessedAt != nil {
				fmt.Fprintf(tw, "processed:\t%s\n", a.ProcessedAt.Format(time.RFC3339Nano))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "delivery:")
			b, _ := json.MarshalIndent(delivery, "", "  ")
			fmt.Fprintln(cmd.OutOrStdout(), string(b))
			return nil
		},
	}
	addFlags(cmd, "db", "app", "binary")
	addFormatFlag(cmd)
	return cmd
}

func newInboxStatsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "stats",
		Short: "Counts by status and type, duplicates absorbed, oldest and newest",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, format, db, err := loadConfigFormatAndDB(cmd)
			if err != nil {
				return err
			}
			defer db.Close()
			st, err := inbox.Stats(cmd.Context(), db, cfg.App)
			if err != nil {
				return err
			}
			return printStats(cmd, format, st)
		},
	}
	addFlags(cmd, "db", "app")
	addFormatFlag(cmd)
	return cmd
}

func printStats(cmd *cobra.Command, format string, st inbox.Summary) error {
	if format == "json" {
		out := map[string]any{
			"consumer": st.Consumer, "total": st.Total, "by_status": st.ByStatus, "by_event_type": st.ByEventType,
			"duplicates_absorbed": st.Duplicates, "oldest": nilTime(st.Oldest), "newest": nilTime(st.Newest),
		}
		return writeJSON(cmd.OutOrStdout(), out)
	}
	w := cmd.OutOrStdout()
	who := st.Consumer
	if who == "" {
		who = "all consumers"
	}
	fmt.Fprintf(w, "inbox of %s: %d messages, %d duplicates absorbed\n", who, st.Total, st.Duplicates)
	if st.Total > 0 {
		fmt.Fprintf(w, "oldest %s, newest %s\n", st.Oldest.Format(time.RFC3339), st.Newest.Format(time.RFC3339))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STATUS\tCOUNT")
	for _, s := range []inbox.Status{inbox.StatusProcessed, inbox.StatusRetrying, inbox.StatusPoisoned} {
		fmt.Fprintf(tw, "%s\t%d\n", s, st.ByStatus[s])
	}
	fmt.Fprintln(tw, "\t")
	fmt.Fprintln(tw, "EVENT TYPE\tCOUNT")
	types := make([]string, 0, len(st.ByEventType))
	for t := range st.ByEventType {
		types = append(types, t)
	}
	sort.Strings(types)
	for _, t := range types {
		fmt.Fprintf(tw, "%s\t%d\n", t, st.ByEventType[t])
	}
	return tw.Flush()
}

func nilTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}
