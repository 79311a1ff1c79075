package consumer_test

import (
	"context"
	dbsql "database/sql"
	"errors"
	"fmt"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/test/testenv"
)

func TestCleanStopWhileHandlersRun(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := b.cfg
	cfg.Concurrency = 4
	cfg.RetryDelays = []time.Duration{time.Hour}
	started := make(chan string, 100)
	c, err := consumer.New(b.track(cfg), consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		started <- d.MessageID
		time.Sleep(50 * time.Millisecond)
		return effect(ctx, tx, d)
	}))
	require.NoError(t, err)
	const n = 60
	var evs []amqp.Publishing
	for i := range n {
		evs = append(evs, b.event(fmt.Sprintf("id-%03d", i)))
	}
	require.NoError(t, consumer.DeclareTopology(context.Background(), b.conn, cfg))
	b.publish(t, "", publisher.QueueName(b.name), evs...)

	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- c.Run(ctx) }()
	for range 10 {
		<-started
	}
	cancel() // while a batch of handlers runs
	select {
	case err := <-ran:
		require.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return after the context was cancelled")
	}
	require.NoError(t, c.Err())

	committed := b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'processed'`)
	t.Logf("committed %d of %d before the stop", committed, n)
	require.GreaterOrEqual(t, committed, 10)
	require.Less(t, committed, n)
	require.Equal(t, committed, b.count(t, `SELECT count(*) FROM warren_inbox`), "no failure was recorded")
	require.Equal(t, committed, b.count(t, `SELECT count(*) FROM effects`))
	require.Zero(t, b.counts.retried.Load())
	require.Zero(t, b.counts.poisoned.Load())
	require.Zero(t, b.depth(t, publisher.RetryQueueName(b.name, time.Hour)), "nothing dead-lettered")
	require.Zero(t, b.depth(t, publisher.PoisonQueueName(b.name)))
	require.Eventually(t, func() bool { return b.depth(t, publisher.QueueName(b.name)) == n-committed }, 5*time.Second, 10*time.Millisecond,
		"every committed delivery was acked, the rest is back")

	// Nothing committed comes again.
	again := &counts{reasons: map[string]int{}}
	cfg.Hooks = again.hooks()
	b.start(t, cfg, consumer.HandlerFunc(effect))
	require.Eventually(t, func() bool { return b.count(t, `SELECT count(*) FROM effects`) == n }, 20*time.Second, 10*time.Millisecond)
	require.Zero(t, again.duplicates.Load(), "a committed delivery was redelivered")
	require.EqualValues(t, n-committed, again.delivered.Load())
	require.Equal(t, n, b.count(t, `SELECT count(DISTINCT message_id) FROM effects`))
	require.Equal(t, n, b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'processed' AND attempts = 1`),
		"deliveries only prefetched at the stop do not count an attempt")
}

func TestStartStopSafety(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c, err := consumer.New(b.cfg, consumer.Inbox)
	require.NoError(t, err)
	ctx := context.Background()
	require.NoError(t, c.Start(ctx))
	require.ErrorIs(t, c.Start(ctx), consumer.ErrStarted)
	require.NoError(t, c.Stop(ctx))
	require.NoError(t, c.Stop(ctx))
	<-c.Stopped()
	require.ErrorIs(t, c.Start(ctx), consumer.ErrStarted)
	require.ErrorIs(t, c.Run(ctx), consumer.ErrStarted)

	never, err := consumer.New(b.cfg, consumer.Inbox)
	require.NoError(t, err)
	require.NoError(t, never.Stop(ctx))
	require.ErrorIs(t, never.Start(ctx), consumer.ErrStarted)
}

func TestStartRefusesAnUnmigratedDatabase(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := b.db.Exec(`DROP TABLE warren_schema`)
	require.NoError(t, err)
	c, err := consumer.New(b.cfg, consumer.Inbox)
	require.NoError(t, err)
	err = c.Start(context.Background())
	require.Error(t, err)
	require.Contains(t, err.Error(), "warren migrate")
}

func TestTopology(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("DeclareThenVerify", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		cfg := b.cfg
		cfg.RetryDelays = []time.Duration{500 * time.Millisecond, 5 * time.Second, 5 * time.Second}
		b.track(cfg)
		require.NoError(t, consumer.DeclareTopology(ctx, b.conn, cfg))
		require.NoError(t, consumer.DeclareTopology(ctx, b.conn, cfg), "idempotent")
		require.NoError(t, consumer.VerifyTopology(ctx, b.conn, cfg))
		for _, q := range []string{b.name, b.name + ".retry.500ms", b.name + ".retry.5s", b.name + ".poison"} {
			require.Zero(t, b.depth(t, q))
		}
		// The retry queue dead-letters to the queue after its delay.
		b.publish(t, "", b.name+".retry.500ms", b.event("x"))
		require.Eventually(t, func() bool { return b.depth(t, b.name) == 1 }, 5*time.Second, 20*time.Millisecond)
		// The binding routes the producer's events.
		b.publish(t, publisher.ExchangeName(b.producer), "any.thing", b.event("y"))
		require.Eventually(t, func() bool { return b.depth(t, b.name) == 2 }, 5*time.Second, 20*time.Millisecond)
	})

	t.Run("VerifyNamesWhatIsMissing", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		err := consumer.VerifyTopology(ctx, b.conn, b.cfg)
		require.Error(t, err)
		require.ErrorIs(t, err, consumer.ErrTopologyMissing)
		require.ErrorIs(t, err, publisher.ErrExchangeMissing)
		for _, name := range []string{publisher.ExchangeName(b.producer), b.name, b.name + ".retry.1s", b.name + ".retry.10m", b.name + ".poison"} {
			require.Contains(t, err.Error(), fmt.Sprintf("%q", name))
		}
		require.Contains(t, err.Error(), "warren topology declare")

		// A consumer that may only verify refuses to start.
		cfg := b.cfg
		cfg.NoDeclare = true
		c, err := consumer.New(cfg, consumer.Inbox)
		require.NoError(t, err)
		err = c.Start(ctx)
		require.ErrorIs(t, err, consumer.ErrTopologyMissing)
		require.Contains(t, err.Error(), "warren topology declare")

		require.NoError(t, consumer.DeclareTopology(ctx, b.conn, b.cfg))
		c, err = consumer.New(cfg, consumer.Inbox)
		require.NoError(t, err)
		require.NoError(t, c.Start(ctx))
		require.NoError(t, c.Stop(ctx))
	})

	t.Run("Mismatch", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ch, err := b.conn.Channel()
		require.NoError(t, err)
		_, err = ch.QueueDeclare(b.name, true, false, false, false, amqp.Table{amqp.QueueTypeArg: amqp.QueueTypeClassic})
		require.NoError(t, err)
		require.NoError(t, ch.Close())
		err = consumer.DeclareTopology(ctx, b.conn, b.cfg)
		require.ErrorIs(t, err, consumer.ErrTopologyMismatch)
		require.Contains(t, err.Error(), fmt.Sprintf("%q", b.name))
		err = consumer.VerifyTopology(ctx, b.conn, b.cfg)
		require.ErrorIs(t, err, consumer.ErrTopologyMismatch)

		cfg := b.cfg
		cfg.QueueType = consumer.Classic
		require.NoError(t, consumer.DeclareTopology(ctx, b.conn, cfg))
	})
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	db, _ := testenv.DB(t)
	good := consumer.Config{Consumer: "billing", DB: db, From: []consumer.Subscription{{Producer: "crm"}}}
	require.NoError(t, good.Validate())
	d := good.WithDefaults()
	require.Equal(t, consumer.Quorum, d.QueueType)
	require.Equal(t, 32, d.Concurrency)
	require.Equal(t, 64, d.Prefetch)
	require.Equal(t, 30*time.Second, d.HandlerTimeout)
	require.Equal(t, 5, d.MaxAttempts)
	require.Equal(t, 1, d.ImmediateRetries)
	require.Equal(t, consumer.DefaultRetryDelays(), d.RetryDelays)
	require.Equal(t, 1<<20, d.MaxBodyBytes)
	require.Equal(t, []string{"#"}, d.From[0].Keys)
	require.Equal(t, "amqp://guest:guest@localhost:5672/", d.Connection.URL)

	for _, tc := range []struct {
		change func(*consumer.Config)
		want   string
	}{
		{func(c *consumer.Config) { c.Consumer = "" }, "consumer app"},
		{func(c *consumer.Config) { c.Consumer = "Billing!" }, "consumer app"},
		{func(c *consumer.Config) { c.DB = nil }, "database"},
		{func(c *consumer.Config) { c.From = nil }, "consumer.from"},
		{func(c *consumer.Config) { c.From = []consumer.Subscription{{Producer: "CRM"}} }, "producer"},
		{func(c *consumer.Config) { c.From = append(c.From, consumer.Subscription{Producer: "crm"}) }, "listed twice"},
		{func(c *consumer.Config) { c.From[0].Keys = []string{"company.up*"} }, "stand alone"},
		{func(c *consumer.Config) { c.From[0].Keys = []string{""} }, "empty"},
		{func(c *consumer.Config) { c.Connection.URL = "http://x" }, "connection_string"},
		{func(c *consumer.Config) { c.QueueType = "stream" }, "queue type"},
		{func(c *consumer.Config) { c.Concurrency = -1 }, "concurrency"},
		{func(c *consumer.Config) { c.Concurrency = 4; c.Prefetch = 2 }, "prefetch"},
		{func(c *consumer.Config) { c.HandlerTimeout = -time.Second }, "handler_timeout"},
		{func(c *consumer.Config) { c.MaxAttempts = -1 }, "max_attempts"},
		{func(c *consumer.Config) { c.ImmediateRetries = -2 }, "immediate retries"},
		{func(c *consumer.Config) { c.RetryDelays = []time.Duration{time.Second, 0} }, "retry delay 2 (retry_delays)"},
		{func(c *consumer.Config) { c.Expiration = -time.Second }, "expiration"},
		{func(c *consumer.Config) { c.MaxBodyBytes = -5 }, "max body bytes"},
	} {
		cfg := good
		cfg.From = []consumer.Subscription{{Producer: "crm"}}
		tc.change(&cfg)
		err := cfg.Validate()
		require.Error(t, err, tc.want)
		require.Contains(t, err.Error(), tc.want)
		_, err = consumer.New(cfg, consumer.Inbox)
		require.Error(t, err)
	}
	_, err := consumer.New(good, nil)
	require.Error(t, err)
	require.True(t, errors.Is(good.Validate(), nil))
}
