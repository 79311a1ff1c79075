package consumer_test

import (
	"context"
	dbsql "database/sql"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
)

func TestDuplicatesRunTheHandlerOnce(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.start(t, b.cfg, consumer.HandlerFunc(effect))

	ev := b.event("0192b3a4-0000-7000-8000-000000000001")
	for range 5 {
		b.publish(t, "", publisher.QueueName(b.name), ev)
	}
	require.Eventually(t, func() bool { return b.counts.delivered.Load() == 5 && b.counts.duplicates.Load() == 4 },
		10*time.Second, 10*time.Millisecond, "delivered %d, duplicates %d", b.counts.delivered.Load(), b.counts.duplicates.Load())

	require.Equal(t, 1, b.count(t, `SELECT count(*) FROM effects`))
	require.Equal(t, 1, b.count(t, `SELECT count(*) FROM warren_inbox`))
	e := b.entry(t, ev.MessageId)
	require.Equal(t, inbox.StatusProcessed, e.Status)
	require.Equal(t, 1, e.Attempts)
	require.Equal(t, 4, e.Duplicates)
	require.Equal(t, "company", e.AggregateType)
	require.Equal(t, "42", e.AggregateID)
	require.Equal(t, int64(3), *e.AggregateVersion)
	require.Equal(t, b.producer, e.Producer)
	require.Equal(t, `{"name":"Acme"}`, string(e.Body))

	st, err := inbox.Stats(context.Background(), b.db, b.name)
	require.NoError(t, err)
	require.EqualValues(t, 4, st.Duplicates)
	require.Eventually(t, func() bool { return b.depth(t, publisher.QueueName(b.name)) == 0 }, 5*time.Second, 10*time.Millisecond)
}

func TestBindsToTheProducerExchange(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := b.cfg
	cfg.From = []consumer.Subscription{{Producer: b.producer, Keys: []string{"company.*"}}}
	b.start(t, cfg, consumer.HandlerFunc(effect))

	created := b.event("id-created")
	created.Type = "company.created"
	other := b.event("id-other")
	other.Type = "invoice.sent"
	b.publish(t, publisher.ExchangeName(b.producer), "company.created", created)
	b.publish(t, publisher.ExchangeName(b.producer), "invoice.sent", other)

	require.Eventually(t, func() bool { return b.count(t, `SELECT count(*) FROM effects`) == 1 }, 10*time.Second, 10*time.Millisecond)
	e := b.entry(t, "id-created")
	require.Equal(t, publisher.ExchangeName(b.producer), e.Exchange)
	require.Equal(t, "company.created", e.RoutingKey)
	require.Equal(t, "company.created", e.EventType)
	time.Sleep(200 * time.Millisecond)
	require.EqualValues(t, 1, b.counts.delivered.Load(), "invoice.sent is not bound")
}

func TestPanicAndTimeoutAreFailures(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := b.cfg
	cfg.HandlerTimeout = 300 * time.Millisecond
	cfg.ImmediateRetries = 2
	calls := map[string]int{}
	b.start(t, cfg, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		calls[d.MessageID]++ // handlers of one batch run one after the other
		switch {
		case d.MessageID == "panics" && d.Attempt == 1:
			panic("boom")
		case d.MessageID == "sleeps" && d.Attempt == 1:
			<-ctx.Done()
			return ctx.Err()
		}
		return effect(ctx, tx, d)
	}))
	b.publish(t, "", publisher.QueueName(b.name), b.event("panics"), b.event("sleeps"), b.event("fine"))
	require.Eventually(t, func() bool { return b.count(t, `SELECT count(*) FROM effects`) == 3 }, 10*time.Second, 10*time.Millisecond)

	e := b.entry(t, "panics")
	require.Equal(t, inbox.StatusProcessed, e.Status)
	require.Equal(t, 2, e.Attempts)
	require.Contains(t, e.LastError, "handler panicked: boom")
	e = b.entry(t, "sleeps")
	require.Equal(t, inbox.StatusProcessed, e.Status)
	require.Equal(t, 2, e.Attempts)
	require.Contains(t, e.LastError, "handler timeout 300ms")
	require.Contains(t, e.LastError, "deadline exceeded")
	e = b.entry(t, "fine")
	require.Equal(t, 1, e.Attempts)
	require.Empty(t, e.LastError)
	require.Zero(t, b.counts.retried.Load())
}

// A handler that ignores its context is abandoned once its deadline and
// the grace have passed: its batch's transaction is rolled back (what it
// writes afterwards goes nowhere), its delivery counts as failed, and the
// rest of its batch commits without it.
func TestHandlerThatIgnoresItsDeadlineIsAbandoned(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := b.cfg
	cfg.HandlerTimeout = 100 * time.Millisecond
	cfg.ImmediateRetries = 2
	var lateWrite atomic.Value
	returned := make(chan struct{})
	b.start(t, cfg, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		if d.MessageID == "stuck" && d.Attempt == 1 {
			defer close(returned)
			time.Sleep(cfg.HandlerTimeout + 3*time.Second) // past the deadline and the grace
			err := effect(context.Background(), tx, d)
			lateWrite.Store(fmt.Sprint(err))
			return err
		}
		return effect(ctx, tx, d)
	}))
	b.publish(t, "", publisher.QueueName(b.name), b.event("a"), b.event("stuck"), b.event("b"))
	require.Eventually(t, func() bool { return b.count(t, `SELECT count(*) FROM effects`) == 3 }, 20*time.Second, 10*time.Millisecond)
	<-returned
	require.Contains(t, lateWrite.Load(), "transaction has already been committed or rolled back", "the abandoned handler's transaction is gone")
	require.Equal(t, 1, b.count(t, `SELECT count(*) FROM effects WHERE message_id = 'stuck' AND attempt = 2`))
	e := b.entry(t, "stuck")
	require.Equal(t, inbox.StatusProcessed, e.Status)
	require.Equal(t, 2, e.Attempts)
	require.Contains(t, e.LastError, "did not return within the handler timeout 100ms")
	for _, id := range []string{"a", "b"} {
		require.Equal(t, 1, b.entry(t, id).Attempts, id)
	}
}

func TestFailingHandlerDoesNotUndoItsBatch(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := b.cfg
	cfg.Concurrency = 8
	cfg.ImmediateRetries = -1
	cfg.RetryDelays = []time.Duration{time.Hour}
	b.start(t, cfg, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		if err := effect(ctx, tx, d); err != nil {
			return err
		}
		if d.MessageID[len(d.MessageID)-1] == '7' {
			return errors.New("sevens fail")
		}
		return nil
	}))
	var evs []amqp.Publishing
	for i := range 100 {
		evs = append(evs, b.event(fmt.Sprintf("id-%03d", i)))
	}
	b.publish(t, "", publisher.QueueName(b.name), evs...)
	require.Eventually(t, func() bool {
		return b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'processed'`) == 90 && b.counts.retried.Load() == 10
	}, 10*time.Second, 10*time.Millisecond)
	require.Equal(t, 90, b.count(t, `SELECT count(*) FROM effects`), "the failed handlers' writes are rolled back, the others' kept")
	require.Equal(t, 0, b.count(t, `SELECT count(*) FROM effects WHERE message_id LIKE '%7'`))
	require.Equal(t, 10, b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'retrying' AND last_error = 'sevens fail'`))
	require.Equal(t, 90, b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'processed'`))
	require.Equal(t, 10, b.depth(t, publisher.RetryQueueName(b.name, time.Hour)))
}

// An application that gives its database one connection, as the README
// suggests for its writes, and hands that database to the consumer: the
// consumer takes the connection for its commits and gives it back when the
// queue is idle, so the application's own statements run between
// deliveries instead of waiting for the consumer to stop.
func TestConsumerSharesAOneConnectionPool(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.db.SetMaxOpenConns(1)
	b.start(t, b.cfg, consumer.HandlerFunc(effect))

	for round := range 3 {
		var evs []amqp.Publishing
		for i := range 20 {
			evs = append(evs, b.event(fmt.Sprintf("0192b3a4-0000-7000-8000-%012d", round*100+i)))
		}
		b.publish(t, "", publisher.QueueName(b.name), evs...)
		require.Eventually(t, func() bool { return b.counts.delivered.Load() == int64(20*(round+1)) },
			10*time.Second, 10*time.Millisecond, "delivered %d", b.counts.delivered.Load())
		// The application writes on its one connection, promptly.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := b.db.ExecContext(ctx, `INSERT INTO effects (message_id, attempt) VALUES ('app', 0)`)
		cancel()
		require.NoError(t, err, "the application's write waited for the consumer's connection")
	}
	require.Equal(t, 63, b.count(t, `SELECT count(*) FROM effects`))
}
