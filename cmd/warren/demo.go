package main

import (
	"context"
	"crypto/rand"
	dbsql "database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/relay"
	wsql "github.com/warrenmq/warren/sql"
)

func newDemoCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the whole path once on a local database and broker, and print the inbox",
		Long: `demo shows warren end to end in a few seconds, on a temporary SQLite file
(or --db) and the broker at --url:

  1. a producer application "crm" appends company events to the outbox in
     its business transactions (one transaction rolls back: its event is
     never published);
  2. the relay publishes them to crm.events with publisher confirms;
  3. a consumer "billing" handles them in transactions that also write
     its inbox; its handler fails the first attempt of every fifth event,
     which comes back through billing.retry.1s and then succeeds;
  4. one event is published a second time: the inbox absorbs it;
  5. it prints warren inbox stats and the newest inbox rows.

The exchange and queues get a random suffix and are deleted at the end.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			events, _ := cmd.Flags().GetInt("events")
			if events < 5 || events > 100000 {
				return fmt.Errorf("flag --events: must be from 5 to 100000")
			}
			keep, _ := cmd.Flags().GetBool("keep")
			dbFlag := cmd.Flags().Lookup("db")
			if !dbFlag.Changed && os.Getenv("WARREN_DB") == "" {
				dir, err := os.MkdirTemp("", "warren-demo-")
				if err != nil {
					return err
				}
				if !keep {
					defer os.RemoveAll(dir)
				}
				cfg.Database = filepath.Join(dir, "demo.db")
			}
			logw := io.Discard
			if v, _ := cmd.Flags().GetBool("verbose"); v {
				logw = cmd.ErrOrStderr()
			}
			ctx, stop := signalContext(cmd.Context(), newLogger(cfg, cmd.ErrOrStderr()))
			defer stop()
			return runDemo(ctx, cmd, cfg, events, newLogger(cfg, logw))
		},
	}
	addFlags(cmd, "db", "url", "log-level")
	cmd.Flags().Int("events", 20, "how many events the producer appends")
	cmd.Flags().Bool("keep", false, "keep the temporary database (its path is printed)")
	cmd.Flags().Bool("verbose", false, "show the relay's and consumer's logs")
	return cmd
}

func randomSuffix() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func runDemo(ctx context.Context, cmd *cobra.Command, cfg Config, events int, log *slog.Logger) (err error) {
	out := cmd.OutOrStdout()
	say := func(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }
	suffix := randomSuffix()
	producer, app := "crm-demo-"+suffix, "billing-demo-"+suffix
	conncfg := connectionConfig(cfg, "warren demo")

	say("warren demo: database %s, broker %s", cfg.Database, publisher.RedactURL(cfg.URL))
	db, err := wsql.Open(ctx, cfg.Database, wsql.Options{})
	if err != nil {
		return err
	}
	defer db.Close()
	if _, err := wsql.Migrate(ctx, db); err != nil {
		return err
	}
	conn, err := publisher.Dial(ctx, conncfg)
	if err != nil {
		return err
	}
	defer conn.Close()

	retry := time.Second
	ccfg := consumer.Config{
		Consumer: app, DB: db, From: []consumer.Subscription{{Producer: producer}},
		Connection: conncfg, ImmediateRetries: -1, RetryDelays: []time.Duration{retry}, MaxAttempts: 3,
		Logger: log,
	}
	defer cleanupDemo(conn, producer, app, retry)
	if err := consumer.DeclareTopology(ctx, conn, ccfg); err != nil {
		return err
	}

	// 1. The producer: business writes and events in one transaction.
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS demo_company (id INTEGER PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS demo_invoice_account (event_id TEXT PRIMARY KEY, company_id TEXT NOT NULL, event_type TEXT NOT NULL)`); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	companies := max(events/4, 1)
	txs := 0
	for i := 0; i < events; {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		var evs []outbox.Event
		for j := 0; j < 2 && i < events; j, i = j+1, i+1 {
			id := i%companies + 1
			typ := "company.updated"
			if i < companies {
				typ = "company.created"
			}
			var version int64
			if err := tx.QueryRowContext(ctx, `INSERT INTO demo_company (id, name, version) VALUES (?, ?, 1)
				ON CONFLICT (id) DO UPDATE SET name = excluded.name, version = version + 1 RETURNING version`,
				id, fmt.Sprintf("Company %d rev %d", id, i)).Scan(&version); err != nil {
				_ = tx.Rollback()
				return fmt.Errorf("demo: %w", err)
			}
			evs = append(evs, outbox.Event{Producer: producer, Type: typ, AggregateType: "company", AggregateID: fmt.Sprint(id),
				AggregateVersion: outbox.Version(version), Payload: []byte(fmt.Sprintf(`{"id":%d,"name":"Company %d rev %d"}`, id, id, i))})
		}
		if _, err := outbox.Append(ctx, tx, evs...); err != nil {
			_ = tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		txs++
	}
	// A business transaction that fails: its event is never published.
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if _, err := outbox.Append(ctx, tx, outbox.Event{Producer: producer, Type: "company.deleted", AggregateType: "company", AggregateID: "1", Payload: []byte(`{"id":1}`)}); err != nil {
		return err
	}
	_ = tx.Rollback()
	say("1. producer %s appended %d events in %d business transactions (and one rolled-back transaction, whose event is never published)", producer, events, txs)

	// 2. The relay and 3. the consumer, in this process.
	pub, err := publisher.New(publisher.Config{Connection: conncfg, Logger: log})
	if err != nil {
		return err
	}
	defer pub.Close()
	r, err := relay.New(relay.Config{DB: db, DBPath: cfg.Database, Publisher: pub, Logger: log})
	if err != nil {
		return err
	}
	var failed atomic.Int64
	handler := consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		var n int64
		fmt.Sscan(d.AggregateID, &n)
		if d.Attempt == 1 && d.AggregateVersion != nil && (*d.AggregateVersion+n)%5 == 0 {
			failed.Add(1)
			return errors.New("billing service is warming up (the demo fails this first attempt on purpose)")
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO demo_invoice_account (event_id, company_id, event_type) VALUES (?, ?, ?)`, d.MessageID, d.AggregateID, d.EventType)
		return err
	})
	c, err := consumer.New(ccfg, handler)
	if err != nil {
		return err
	}
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	relayDone := make(chan error, 1)
	start := time.Now()
	go func() { relayDone <- r.Run(runCtx) }()
	if err := c.Start(ctx); err != nil {
		return err
	}
	defer func() { _ = c.Stop(context.Background()) }()

	if err := waitFor(ctx, 30*time.Second, func() (bool, error) {
		var n int
		err := db.QueryRowContext(ctx, `SELECT count(*) FROM warren_outbox WHERE producer = ? AND published_at IS NOT NULL`, producer).Scan(&n)
		return n == events, err
	}); err != nil {
		return fmt.Errorf("demo: waiting for the relay: %w", err)
	}
	say("2. relay published %d events to %s; the broker confirmed each one before its row was marked (%s)", events, publisher.ExchangeName(producer), time.Since(start).Round(time.Millisecond))

	processed := func() (int, error) {
		var n int
		err := db.QueryRowContext(ctx, `SELECT count(*) FROM warren_inbox WHERE consumer = ? AND status = 'processed'`, app).Scan(&n)
		return n, err
	}
	if err := waitFor(ctx, 30*time.Second, func() (bool, error) { n, err := processed(); return n == events, err }); err != nil {
		return fmt.Errorf("demo: waiting for the consumer: %w", err)
	}
	say("3. consumer %s processed all %d; %d first attempts failed on purpose, went through %s and succeeded (%s)",
		app, events, failed.Load(), publisher.RetryQueueName(app, retry), time.Since(start).Round(time.Millisecond))

	// 4. A duplicate, as a relay crash between confirm and mark would cause:
	// the first event is published a second time.
	row, _, err := outbox.Get(ctx, db, firstSeq(ctx, db, producer), 0)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	dup := message.NewMessage(row.EventID, row.Payload)
	dup.Metadata.Set(publisher.MetaRoutingKey, row.EventType)
	dup.Metadata.Set(publisher.MetaType, row.EventType)
	dup.Metadata.Set(publisher.MetaAppID, row.Producer)
	dup.Metadata.Set(publisher.HeaderAggregateType, row.AggregateType)
	dup.Metadata.Set(publisher.HeaderAggregateID, row.AggregateID)
	if err := pub.Publish(publisher.ExchangeName(producer), dup); err != nil {
		return fmt.Errorf("demo: publish the duplicate: %w", err)
	}
	if err := waitFor(ctx, 30*time.Second, func() (bool, error) {
		st, err := inbox.Stats(ctx, db, app)
		return st.Duplicates >= 1, err
	}); err != nil {
		return fmt.Errorf("demo: waiting for the duplicate: %w", err)
	}
	var effects int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM demo_invoice_account`).Scan(&effects); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	say("4. one event was published a second time: the inbox recognised it and acked it without running the handler (%d handler effects for %d events)", effects, events)

	stopRun()
	if err := <-relayDone; err != nil {
		return err
	}
	if err := c.Stop(context.Background()); err != nil {
		return err
	}

	say("\n$ warren inbox stats --app %s", app)
	st, err := inbox.Stats(ctx, db, app)
	if err != nil {
		return err
	}
	if err := printStats(cmd, "table", st); err != nil {
		return err
	}
	say("\n$ warren inbox list --app %s --limit 6", app)
	page, err := inbox.List(ctx, db, inbox.Filter{Consumer: app, Limit: 6})
	if err != nil {
		return err
	}
	for _, e := range page.Entries {
		say("%s  %-16s %-8s %s:%-3s attempts=%d dups=%d %s", e.ReceivedAt.Format("15:04:05.000"), e.EventType, e.Status, e.AggregateType, e.AggregateID, e.Attempts, e.Duplicates, oneLineText(e.LastError, 50))
	}
	if effects != events {
		return fmt.Errorf("demo: %d handler effects for %d events: effectively-once did not hold", effects, events)
	}
	say("\ndemo passed: %d events, each processed exactly once.", events)
	return nil
}

func firstSeq(ctx context.Context, db *dbsql.DB, producer string) int64 {
	var seq int64
	_ = db.QueryRowContext(ctx, `SELECT min(seq) FROM warren_outbox WHERE producer = ?`, producer).Scan(&seq)
	return seq
}

func waitFor(ctx context.Context, d time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(d)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not done within %s", d)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// cleanupDemo deletes what the demo declared.
func cleanupDemo(conn *amqp.Connection, producer, app string, retry time.Duration) {
	for _, q := range []string{app, publisher.RetryQueueName(app, retry), publisher.PoisonQueueName(app)} {
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(q, false, false, false)
			_ = ch.Close()
		}
	}
	if ch, err := conn.Channel(); err == nil {
		_ = ch.ExchangeDelete(publisher.ExchangeName(producer), false, false)
		_ = ch.Close()
	}
}
