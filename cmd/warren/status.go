package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
)

// inFlightNote says what the queue columns show.
const inFlightNote = "READY counts the messages waiting in a queue. Deliveries sent to a consumer and not yet acked (in flight) are not reported over AMQP: the consumer's /metrics has them as warren_consumer_in_flight."

type statusJSON struct {
	Database  string                  `json:"database"`
	Broker    brokerJSON              `json:"broker"`
	Producers []outbox.ProducerStatus `json:"producers"`
	Consumers []consumerStatusJSON    `json:"consumers"`
	Note      string                  `json:"note"`
}

type brokerJSON struct {
	URL       string `json:"url"`
	Connected bool   `json:"connected"`
	Version   string `json:"version,omitempty"`
	Error     string `json:"error,omitempty"`
}

type consumerStatusJSON struct {
	Consumer string                 `json:"consumer"`
	Queues   *consumer.Queues       `json:"queues"` // null when the broker is unreachable
	Inbox    inbox.ConsumerOverview `json:"inbox"`
}

func newStatusCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "One screen: outbox backlog per producer, queues and failures per consumer",
		Long: `status reads the database and the broker and prints, per producer, the
outbox backlog and the age of the oldest unpublished event (the relay's lag);
and per consumer (--app, or every consumer the inbox has seen) the messages
ready in its queue, the consumers reading it, the depth of each retry queue
(for --retry-delays) and of the poison queue, and the last error the inbox
recorded for a delivery that is retrying or poisoned now.

Queue depths come from passive declares: no management plugin is needed and
nothing is changed. AMQP does not report deliveries in flight (sent, not
yet acked): the consumer's metrics do (warren_consumer_in_flight).

When the broker cannot be reached, status prints what the database says
and exits 1.

  warren status --db billing.db
  warren status --db billing.db --app billing --format json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, format, err := loadConfigAndFormat(cmd)
			if err != nil {
				return err
			}
			if cfg.App != "" {
				if err := publisher.ValidateName(cfg.App); err != nil {
					return fmt.Errorf("--app: %w", err)
				}
			}
			st, brokerErr, err := gatherStatus(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			if format == "json" {
				err = writeJSON(cmd.OutOrStdout(), st)
			} else {
				err = printStatus(cmd.OutOrStdout(), st, cfg.RetryDelays)
			}
			if err != nil {
				return err
			}
			return brokerErr
		},
	}
	addFlags(cmd, "db", "url", "app", "retry-delays")
	addFormatFlag(cmd)
	return cmd
}

// gatherStatus reads the database and the broker. brokerErr says why the
// broker part is missing; err is a failure of the database.
func gatherStatus(ctx context.Context, cfg Config) (st statusJSON, brokerErr, err error) {
	st = statusJSON{Database: cfg.Database, Broker: brokerJSON{URL: publisher.RedactURL(cfg.URL)}, Note: inFlightNote}
	db, err := openDB(ctx, cfg)
	if err != nil {
		return st, nil, err
	}
	defer db.Close()
	if st.Producers, err = outbox.Status(ctx, db); err != nil {
		return st, nil, err
	}
	if st.Producers == nil {
		st.Producers = []outbox.ProducerStatus{}
	}
	names := []string{cfg.App}
	if cfg.App == "" {
		if names, err = inbox.Consumers(ctx, db); err != nil {
			return st, nil, err
		}
	}
	st.Consumers = []consumerStatusJSON{}
	for _, name := range names {
		ov, err := inbox.Overview(ctx, db, name)
		if err != nil {
			return st, nil, err
		}
		st.Consumers = append(st.Consumers, consumerStatusJSON{Consumer: name, Inbox: ov})
	}

	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := publisher.Dial(dialCtx, connectionConfig(cfg, "warren status"))
	if err != nil {
		st.Broker.Error = err.Error()
		return st, fmt.Errorf("broker: %w", err), nil
	}
	defer conn.Close()
	st.Broker.Connected = true
	if v, ok := conn.Properties["version"].(string); ok {
		st.Broker.Version = v
	}
	var errs []error
	for i := range st.Consumers {
		qs, err := consumer.InspectQueues(dialCtx, conn, st.Consumers[i].Consumer, cfg.RetryDelays)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		st.Consumers[i].Queues = &qs
	}
	if err := errors.Join(errs...); err != nil {
		st.Broker.Error = oneLine(err.Error())
		return st, err, nil
	}
	return st, nil, nil
}

func printStatus(w io.Writer, st statusJSON, delays []time.Duration) error {
	broker := st.Broker.URL
	switch {
	case st.Broker.Error != "":
		broker += "  UNREACHABLE: " + st.Broker.Error
	case st.Broker.Version != "":
		broker += "  (RabbitMQ " + st.Broker.Version + ")"
	}
	fmt.Fprintf(w, "database  %s\nbroker    %s\n\n", st.Database, broker)

	if len(st.Producers) == 0 {
		fmt.Fprintln(w, "producers: none (the outbox is empty)")
	} else {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PRODUCER\tBACKLOG\tOLDEST UNPUBLISHED\tLAST PUBLISHED\tPUBLISHED (KEPT)")
		for _, p := range st.Producers {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d\n", p.Producer, p.Backlog, ago(p.OldestUnpublished), ago(p.LastPublished), p.Published)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	fmt.Fprintln(w)

	if len(st.Consumers) == 0 {
		fmt.Fprintln(w, "consumers: none (give --app, or the inbox has no rows yet)")
		return nil
	}
	var ds []string
	for _, d := range delays {
		ds = append(ds, publisher.FormatDelay(d))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "CONSUMER\tREADY\tCONSUMERS\tRETRY %s\tPOISON\tRETRYING\tLAST RECEIVED\n", strings.Join(ds, "/"))
	failing := false
	for _, c := range st.Consumers {
		ready, readers, retry, poison := "?", "?", "?", "?"
		if q := c.Queues; q != nil {
			ready, readers = depth(q.Queue), fmt.Sprint(q.Queue.Consumers)
			if q.Queue.Missing {
				readers = "-"
			}
			var rs []string
			for _, r := range q.Retry {
				rs = append(rs, depth(r))
			}
			retry, poison = strings.Join(rs, "/"), depth(q.Poison)
		}
		failing = failing || c.Inbox.LastErrorID != ""
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", c.Consumer, ready, readers, retry, poison, c.Inbox.Retrying, ago(c.Inbox.LastReceived))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if failing {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "CONSUMER\tLAST ERROR (of a delivery retrying or poisoned now)\tRECEIVED\tMESSAGE ID")
		for _, c := range st.Consumers {
			if c.Inbox.LastErrorID != "" {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Consumer, oneLineText(c.Inbox.LastError, 100), ago(c.Inbox.LastErrorAt), c.Inbox.LastErrorID)
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	fmt.Fprintf(w, "\n%s\n", wrap(st.Note, 78))
	return nil
}

// depth is a queue's ready count, or "missing".
func depth(q consumer.QueueState) string {
	if q.Missing {
		return "missing"
	}
	return fmt.Sprint(q.Ready)
}

// ago says how long ago t was, to a precision that suits the span.
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t)
	switch {
	case d < time.Second:
		d = d.Round(time.Millisecond)
	case d < time.Minute:
		d = d.Round(100 * time.Millisecond)
	default:
		d = d.Round(time.Second)
	}
	return d.String() + " ago"
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// wrap breaks s into lines of at most width runes at spaces.
func wrap(s string, width int) string {
	var b strings.Builder
	n := 0
	for i, w := range strings.Fields(s) {
		if i > 0 {
			if n+1+len(w) > width {
				b.WriteByte('\n')
				n = 0
			} else {
				b.WriteByte(' ')
				n++
			}
		}
		b.WriteString(w)
		n += len(w)
	}
	return b.String()
}
