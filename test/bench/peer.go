package main

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/stdlib"
)

// peerResult is figure 5.
type peerResult struct {
	rate
	Setup string // how the peer was configured, for the report
	PG    string // the PostgreSQL version
}

// peerSetup says how the forwarder is configured; it is printed under the
// table.
const peerSetup = "watermill-sql v3.1.0 DefaultPostgreSQLSchema and DefaultPostgreSQLOffsetsAdapter " +
	"(SubscribeBatchSize 100, the default), pgx v4 stdlib; messages appended with forwarder.NewPublisher over the SQL publisher " +
	"in transactions of 10,000; components/forwarder from watermill v1.5.1 publishing with watermill-amqp v2.1.3 " +
	"(NewDurablePubSubConfig with a durable topic exchange, Publish.ConfirmDelivery, Publish.ChannelPoolSize 1 " +
	"so that a channel is not opened per message) to a quorum queue bound with #"

// openPG opens the PostgreSQL database of WARREN_BENCH_PG.
func openPG(ctx context.Context, dsn string) (*sql.DB, string, error) {
	conf, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, "", fmt.Errorf("WARREN_BENCH_PG: %w", err)
	}
	db := stdlib.OpenDB(*conf)
	var version string
	if err := db.QueryRowContext(ctx, `SHOW server_version`).Scan(&version); err != nil {
		_ = db.Close()
		return nil, "", fmt.Errorf("connect to PostgreSQL (WARREN_BENCH_PG, user %q, database %q on %s:%d): %w", conf.User, conf.Database, conf.Host, conf.Port, err)
	}
	if i := strings.IndexByte(version, ' '); i > 0 {
		version = version[:i]
	}
	return db, "PostgreSQL " + version, nil
}

// peer is figure 5: the Watermill forwarder pattern draining an n-message
// outbox on PostgreSQL into a quorum queue, timed until the queue holds
// every message.
func (b *bench) peer(ctx context.Context, n int) (peerResult, error) {
	res := peerResult{Setup: peerSetup}
	db, version, err := openPG(ctx, b.o.pg)
	if err != nil {
		return res, err
	}
	defer db.Close()
	res.PG = version
	logger := watermill.NopLogger{}

	// The outbox table is the forwarder topic's; the destination topic is
	// the exchange.
	fwdTopic := "bench_" + b.id + "_outbox"
	destTopic := b.name("peer")
	schema := wsql.DefaultPostgreSQLSchema{}
	offsets := wsql.DefaultPostgreSQLOffsetsAdapter{}
	sub, err := wsql.NewSubscriber(db, wsql.SubscriberConfig{
		SchemaAdapter:    schema,
		OffsetsAdapter:   offsets,
		InitializeSchema: true,
	}, logger)
	if err != nil {
		return res, err
	}
	if err := sub.SubscribeInitialize(fwdTopic); err != nil {
		return res, fmt.Errorf("create the watermill-sql tables: %w", err)
	}
	// Dropped before db closes, also when the run is interrupted.
	defer func() {
		_, _ = db.ExecContext(context.Background(), `DROP TABLE IF EXISTS `+schema.MessagesTable(fwdTopic)+`, `+offsets.MessagesOffsetsTable(fwdTopic))
	}()

	if err := b.exchange(destTopic); err != nil {
		return res, err
	}
	queue := b.name("peer-q")
	del, err := b.quorumQueue(queue, destTopic)
	if err != nil {
		return res, err
	}
	defer del()

	if err := fillPeer(ctx, db, schema, fwdTopic, destTopic, n); err != nil {
		return res, err
	}

	cfg := wamqp.NewDurablePubSubConfig(b.o.url, nil)
	cfg.Exchange.Type = "topic"
	cfg.Publish.GenerateRoutingKey = func(string) string { return eventType }
	cfg.Publish.ConfirmDelivery = true
	cfg.Publish.ChannelPoolSize = 1
	pub, err := wamqp.NewPublisher(cfg, logger)
	if err != nil {
		return res, fmt.Errorf("watermill-amqp publisher: %w", err)
	}
	defer pub.Close()
	fwd, err := forwarder.NewForwarder(sub, pub, logger, forwarder.Config{ForwarderTopic: fwdTopic})
	if err != nil {
		return res, err
	}

	b.settle(ctx, "5 the peer")
	bar := newBar(n, "5 the peer: forwarder drain")
	m := b.meter(0)
	fctx, stop := context.WithCancel(ctx)
	defer stop()
	runErr := make(chan error, 1)
	start := time.Now()
	go func() { runErr <- fwd.Run(fctx) }()
	end, err := b.waitDepth(ctx, queue, n, 2*time.Hour, bar)
	_ = bar.Finish()
	cpu := m.stop()
	stop()
	_ = fwd.Close()
	if rerr := <-runErr; err == nil && rerr != nil {
		err = rerr
	}
	if err != nil {
		return res, err
	}
	res.rate = rate{N: n, Took: end.Sub(start), CPU: cpu}
	b.logf("figure 5: forwarder drained %d messages in %s: %.0f events/s (%s)", n, res.Took.Round(time.Millisecond), res.PerSec(), cpu)
	return res, nil
}

// fillPeer appends n messages for destTopic through the forwarder's
// publisher decorator over watermill-sql's publisher, in transactions of
// 10,000, as an application using the pattern does (one transaction per
// business write, here batched to fill quickly).
func fillPeer(ctx context.Context, db *sql.DB, schema wsql.SchemaAdapter, fwdTopic, destTopic string, n int) error {
	bar := newBar(n, "fill watermill-sql outbox")
	defer bar.Finish()
	const perTx, perInsert = 10_000, 1_000
	for i := 0; i < n; {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		sqlPub, err := wsql.NewPublisher(tx, wsql.PublisherConfig{SchemaAdapter: schema}, nil)
		if err != nil {
			_ = tx.Rollback()
			return err
		}
		pub := forwarder.NewPublisher(sqlPub, forwarder.PublisherConfig{ForwarderTopic: fwdTopic})
		end := min(i+perTx, n)
		for i < end {
			k := min(perInsert, end-i)
			msgs := make([]*message.Message, k)
			for j := range msgs {
				ev := event("bench", i+j)
				msg := message.NewMessage(watermill.NewUUID(), ev.Payload)
				msg.Metadata.Set("aggregate-type", ev.AggregateType)
				msg.Metadata.Set("aggregate-id", ev.AggregateID)
				msgs[j] = msg
			}
			if err := pub.Publish(destTopic, msgs...); err != nil {
				_ = tx.Rollback()
				return fmt.Errorf("fill watermill-sql outbox: %w", err)
			}
			i += k
		}
		if err := tx.Commit(); err != nil {
			return err
		}
		_ = bar.Set(i)
	}
	return nil
}
