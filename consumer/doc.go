// Package consumer owns the consuming side of warren: a Watermill Router
// over one subscription of the queue "<consumer>" (one AMQP channel with
// the prefetch, Concurrency deliveries in flight, acks of finished
// deliveries batched into multiple acks) that turns
// each delivery into an inbox row and a handler call, committed in one
// transaction, then acked; and the failure path of the contract: immediate
// retries, retry queues "<consumer>.retry.<delay>", the poison queue
// "<consumer>.poison".
//
//	c, err := consumer.New(consumer.Config{
//		Consumer: "billing",
//		DB:       db, // migrated with sql.Migrate
//		From:     []consumer.Subscription{{Producer: "crm", Keys: []string{"company.*"}}},
//	}, consumer.HandlerFunc(func(ctx context.Context, tx *sql.Tx, d *consumer.Delivery) error {
//		_, err := tx.ExecContext(ctx, `INSERT INTO invoices ...`, d.MessageID)
//		return err
//	}))
//	...
//	err = c.Run(ctx) // until ctx is cancelled: then in-flight deliveries finish
//
// The inbox rows of many deliveries commit in one transaction (each
// handler under a savepoint of its own), so throughput does not stop at
// one fsync per delivery. A delivery whose message id was processed
// before is acked without running the handler. Handlers that call slow
// services implement Preparer, whose Prepare runs outside the
// transaction; HTTPSink is one.
//
// DeclareTopology and VerifyTopology serve `warren topology`; ListPoison,
// Redrive and Purge serve `warren poison`.
package consumer
