// Command crashconsumer runs a consumer for warren's crash tests: its
// handler inserts the delivery into an effects table, in the inbox
// transaction. The tests SIGKILL it at random moments and restart it.
//
//	crashconsumer -db app.db -url amqp://... -app billing -from crm [-pill id]
//
// It prints "ready" once deliveries flow, and stops cleanly on SIGTERM.
// With -pill, handling that message id kills the process (exit 3), every
// time: the consumer must end up poisoning it.
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

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "crashconsumer:", err)
		os.Exit(1)
	}
}

func run() error {
	dbPath := flag.String("db", "", "database file (migrated)")
	url := flag.String("url", publisher.DefaultURL, "broker URL")
	app := flag.String("app", "", "consumer name")
	from := flag.String("from", "", "producer")
	concurrency := flag.Int("concurrency", 0, "concurrency")
	maxAttempts := flag.Int("max-attempts", 0, "max attempts")
	pill := flag.String("pill", "", "message id whose handling kills the process")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	db, err := wsql.Open(ctx, *dbPath, wsql.Options{})
	if err != nil {
		return err
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS effects (message_id TEXT NOT NULL, attempt INTEGER NOT NULL)`); err != nil {
		return err
	}
	c, err := consumer.New(consumer.Config{
		Consumer:    *app,
		DB:          db,
		From:        []consumer.Subscription{{Producer: *from}},
		Connection:  publisher.ConnectionConfig{URL: *url},
		Concurrency: *concurrency,
		MaxAttempts: *maxAttempts,
		RetryDelays: []time.Duration{100 * time.Millisecond},
		Logger:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		if d.MessageID == *pill {
			os.Exit(3)
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO effects (message_id, attempt) VALUES (?, ?)`, d.MessageID, d.Attempt)
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
