package consumer_test

import (
	"context"
	dbsql "database/sql"
	"log"
	"os/signal"
	"syscall"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

// A consumer whose handler writes in the inbox transaction: the invoice
// and the inbox row commit together, then the delivery is acked. The
// first signal stops it cleanly: the deliveries in flight finish.
func Example() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	db, err := wsql.Open(ctx, "billing.db", wsql.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	if _, err := wsql.Migrate(ctx, db); err != nil {
		log.Fatal(err)
	}
	c, err := consumer.New(consumer.Config{
		Consumer:   "billing",
		DB:         db,
		From:       []consumer.Subscription{{Producer: "crm", Keys: []string{"company.*"}}},
		Connection: publisher.ConnectionConfig{URL: "amqp://guest:guest@localhost:5672/"},
	}, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO invoices (event_id, body) VALUES (?, ?)`, d.MessageID, d.Body)
		return err // an error rolls the insert back and retries the delivery
	}))
	if err != nil {
		log.Fatal(err)
	}
	if err := c.Run(ctx); err != nil {
		log.Fatal(err)
	}
}
