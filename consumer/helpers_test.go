package consumer_test

import (
	"context"
	dbsql "database/sql"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/test/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// watermill-amqp's ConnectionWrapper.Close races its own
		// close notification: one time in two its watcher goroutine starts
		// a reconnection, which the consumer refuses (no connection
		// outlives it), and then waits forever for a connection.
		goleak.IgnoreTopFunction("github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp.(*ConnectionWrapper).handleConnectionClose"),
	)
}

// testLogger logs errors (everything with WARREN_TEST_LOG=debug) to stderr.
func testLogger() *slog.Logger {
	level := slog.LevelError
	if os.Getenv("WARREN_TEST_LOG") == "debug" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

type testBundle struct {
	db       *dbsql.DB
	dbPath   string
	conn     *amqp.Connection
	name     string // the consumer
	producer string
	cfg      consumer.Config
	counts   *counts

	mu     sync.Mutex
	delays map[time.Duration]bool // of every retry queue a test may have made
}

// counts are the consumer's hooks, counted.
type counts struct {
	delivered, duplicates, retried, poisoned atomic.Int64
	mu                                       sync.Mutex
	reasons                                  map[string]int
}

func (c *counts) hooks() consumer.Hooks {
	return consumer.Hooks{
		Delivered: func() { c.delivered.Add(1) },
		Duplicate: func() { c.duplicates.Add(1) },
		Retried:   func() { c.retried.Add(1) },
		Poisoned: func(reason string) {
			c.poisoned.Add(1)
			c.mu.Lock()
			c.reasons[reason]++
			c.mu.Unlock()
		},
	}
}

// setup gives a test a migrated database with an effects table, a broker
// connection, unique names and a Config; the queues and the exchange are
// deleted when the test ends.
func setup(t testing.TB) *testBundle {
	t.Helper()
	db, path := testenv.DB(t)
	_, err := db.Exec(`CREATE TABLE effects (message_id TEXT NOT NULL, attempt INTEGER NOT NULL)`)
	require.NoError(t, err)
	conn := testenv.Conn(t, testenv.URL())
	b := &testBundle{
		db: db, dbPath: path, conn: conn,
		name:     testenv.Name("c"),
		producer: testenv.Name("p"),
		counts:   &counts{reasons: map[string]int{}},
		delays:   map[time.Duration]bool{},
	}
	b.cfg = consumer.Config{
		Consumer:    b.name,
		DB:          db,
		From:        []consumer.Subscription{{Producer: b.producer}},
		Connection:  publisher.ConnectionConfig{URL: testenv.URL()},
		Concurrency: 4,
		Logger:      testLogger(),
		Hooks:       b.counts.hooks(),
	}
	b.track(b.cfg)
	t.Cleanup(b.deleteTopology)
	return b
}

// track notes the retry queues of cfg, to delete them when the test ends.
func (b *testBundle) track(cfg consumer.Config) consumer.Config {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, d := range cfg.WithDefaults().RetryDelays {
		b.delays[d] = true
	}
	return cfg
}

func (b *testBundle) deleteTopology() {
	queues := []string{publisher.QueueName(b.name), publisher.PoisonQueueName(b.name)}
	b.mu.Lock()
	for d := range b.delays {
		queues = append(queues, publisher.RetryQueueName(b.name, d))
	}
	b.mu.Unlock()
	testenv.DeleteTopology("", b.conn, []string{publisher.ExchangeName(b.producer)}, queues)
}

// start runs a consumer with cfg and h until the test ends (or stop is
// called).
func (b *testBundle) start(t testing.TB, cfg consumer.Config, h consumer.Handler) *consumer.Consumer {
	t.Helper()
	c, err := consumer.New(b.track(cfg), h)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Start(ctx))
	t.Cleanup(func() { _ = c.Stop(context.Background()) })
	return c
}

// effect is a handler that records the delivery in the effects table.
func effect(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO effects (message_id, attempt) VALUES (?, ?)`, d.MessageID, d.Attempt)
	return err
}

func (b *testBundle) event(id string) amqp.Publishing {
	return amqp.Publishing{
		MessageId:    id,
		Type:         "company.updated",
		AppId:        b.producer,
		ContentType:  "application/json",
		DeliveryMode: amqp.Persistent,
		Timestamp:    time.Now(),
		Headers:      amqp.Table{"aggregate-type": "company", "aggregate-id": "42", "aggregate-version": int64(3)},
		Body:         []byte(`{"name":"Acme"}`),
	}
}

// publish publishes ps with confirms to exchange ("" for the default) with
// routing key key.
func (b *testBundle) publish(t testing.TB, exchange, key string, ps ...amqp.Publishing) {
	t.Helper()
	ch, err := b.conn.Channel()
	require.NoError(t, err)
	defer ch.Close()
	require.NoError(t, ch.Confirm(false))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	confs := make([]*amqp.DeferredConfirmation, 0, 256)
	flush := func() {
		for _, c := range confs {
			ok, err := c.WaitContext(ctx)
			require.NoError(t, err)
			require.True(t, ok, "broker nacked a test message")
		}
		confs = confs[:0]
	}
	for _, p := range ps {
		c, err := ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, false, false, p)
		require.NoError(t, err)
		confs = append(confs, c)
		if len(confs) == cap(confs) {
			flush()
		}
	}
	flush()
}

// depth returns the number of ready messages in queue.
func (b *testBundle) depth(t testing.TB, queue string) int {
	t.Helper()
	ch, err := b.conn.Channel()
	require.NoError(t, err)
	defer ch.Close()
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	require.NoError(t, err)
	return q.Messages
}

func (b *testBundle) count(t testing.TB, query string, args ...any) int {
	t.Helper()
	var n int
	require.NoError(t, b.db.QueryRow(query, args...).Scan(&n))
	return n
}

func (b *testBundle) entry(t testing.TB, id string) inbox.Entry {
	t.Helper()
	e, err := inbox.Show(context.Background(), b.db, b.name, id)
	require.NoError(t, err)
	return e
}
