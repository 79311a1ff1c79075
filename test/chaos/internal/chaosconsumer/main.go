// Command chaosconsumer runs the consumer of the chaos test. Its handler
// inserts one row into the effects table in the inbox transaction: the
// message id, the aggregate id and version, the attempt and whether the
// broker redelivered it; the table's autoincrement seq is the order in
// which handler runs committed.
//
//	chaosconsumer -db consumer.db -url amqp://... -app billing -from crm
//
// WARREN_HEARTBEAT sets the AMQP heartbeat. It prints "ready" once the
// queue is declared and deliveries flow, and stops cleanly on SIGTERM.
package main

import (
	"context"
	dbsql "database/sql"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

// Schema is the effects table.
const Schema = `CREATE TABLE IF NOT EXISTS effects (
	seq          INTEGER PRIMARY KEY AUTOINCREMENT,
	message_id   TEXT    NOT NULL,
	aggregate_id TEXT    NOT NULL,
	version      INTEGER NOT NULL,
	attempt      INTEGER NOT NULL,
	redelivered  INTEGER NOT NULL
)`

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "chaosconsumer:", err)
		os.Exit(1)
	}
}

func run() error {
	dbPath := flag.String("db", "", "database file (migrated)")
	url := flag.String("url", publisher.DefaultURL, "broker URL")
	app := flag.String("app", "", "consumer name")
	from := flag.String("from", "", "producer")
	concurrency := flag.Int("concurrency", 0, "concurrency (default the library's)")
	flag.Parse()

	var heartbeat time.Duration
	if s := os.Getenv("WARREN_HEARTBEAT"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("WARREN_HEARTBEAT: %w", err)
		}
		heartbeat = d
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	db, err := wsql.Open(ctx, *dbPath, wsql.Options{})
	if err != nil {
		return err
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, Schema); err != nil {
		return err
	}
	c, err := consumer.New(consumer.Config{
		Consumer:    *app,
		DB:          db,
		From:        []consumer.Subscription{{Producer: *from}},
		Connection:  publisher.ConnectionConfig{URL: *url, Heartbeat: heartbeat},
		Concurrency: *concurrency,
		RetryDelays: []time.Duration{100 * time.Millisecond},
		Logger:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		var version int64 = -1
		if d.AggregateVersion != nil {
			version = *d.AggregateVersion
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO effects (message_id, aggregate_id, version, attempt, redelivered) VALUES (?, ?, ?, ?, ?)`,
			d.MessageID, d.AggregateID, version, d.Attempt, d.Redelivered)
		return err
	}))
	if err != nil {
		return err
	}
	if err := c.Start(ctx); err != nil {
		return err
	}
	fmt.Println("ready")
	select {
	case <-ctx.Done():
	case <-c.Stopped():
	}
	return c.Stop(context.Background())
}
