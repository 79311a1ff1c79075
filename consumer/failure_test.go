package consumer_test

import (
	"context"
	dbsql "database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
)

// TestRetriesThenPoisonThenRedrive is not parallel: it measures delays,
// so it runs before the package's parallel tests load the machine.
func TestRetriesThenPoisonThenRedrive(t *testing.T) {
	ctx := context.Background()
	b := setup(t)
	cfg := b.cfg
	cfg.RetryDelays = []time.Duration{200 * time.Millisecond, 500 * time.Millisecond, time.Second}
	cfg.MaxAttempts = 5
	cfg.ImmediateRetries = -1 // every attempt after the first comes from a retry queue
	// Classic queues: a quorum queue expires messages through its Raft
	// log, which on a busy disk adds tens of milliseconds to a trip. The
	// test checks the delays warren chooses, not the broker's precision
	// (TestTopology sends a message through a quorum retry queue).
	cfg.QueueType = consumer.Classic

	var mu sync.Mutex
	runs := map[string][]time.Time{}
	failing := b.start(t, cfg, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		mu.Lock()
		runs[d.MessageID] = append(runs[d.MessageID], time.Now())
		mu.Unlock()
		if err := effect(ctx, tx, d); err != nil {
			return err
		}
		return fmt.Errorf("attempt %d failed:\nthe ledger is closed", d.Attempt)
	}))
	// delaysOK reports whether the runs of id came at the configured
	// delays, within 20%; the last delay repeats.
	delaysOK := func(id string) bool {
		mu.Lock()
		defer mu.Unlock()
		require.Len(t, runs[id], 5)
		ok := true
		for i, w := range []time.Duration{200 * time.Millisecond, 500 * time.Millisecond, time.Second, time.Second} {
			got := runs[id][i+1].Sub(runs[id][i])
			t.Logf("attempt %d → %d after %s (want %s)", i+1, i+2, got.Round(time.Millisecond), w)
			ok = ok && math.Abs(float64(got-w)) <= 0.2*float64(w)
		}
		return ok || raceEnabled // the race detector slows the path through the broker too much
	}

	ev := b.event("0192b3a4-0000-7000-8000-00000000beef")
	ev.CorrelationId = "corr-7"
	ev.Headers["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	b.publish(t, publisher.ExchangeName(b.producer), "company.updated", ev)
	poison := publisher.PoisonQueueName(b.name)
	require.Eventually(t, func() bool { return b.counts.poisoned.Load() == 1 }, 15*time.Second, 20*time.Millisecond)
	parked := 1
	if !delaysOK(ev.MessageId) {
		// Each trip goes through a few fsyncs on both sides; on a busy
		// machine one can take a hundred milliseconds more. Once more.
		t.Log("a delay was off; measuring once more with another message")
		b.publish(t, publisher.ExchangeName(b.producer), "company.updated", b.event("0192b3a4-0000-7000-8000-00000000bee2"))
		require.Eventually(t, func() bool { return b.counts.poisoned.Load() == 2 }, 15*time.Second, 20*time.Millisecond)
		require.True(t, delaysOK("0192b3a4-0000-7000-8000-00000000bee2"), "the delays were off twice in a row")
		parked = 2
	}
	require.Equal(t, parked, b.depth(t, poison))
	require.Zero(t, b.count(t, `SELECT count(*) FROM effects`), "every failed run was rolled back")
	require.EqualValues(t, 4*parked, b.counts.retried.Load()) // four trips through retry queues each

	e := b.entry(t, ev.MessageId)
	require.Equal(t, inbox.StatusPoisoned, e.Status)
	require.Equal(t, 5, e.Attempts)
	require.Equal(t, "attempt 5 failed: the ledger is closed", e.LastError)
	require.Equal(t, publisher.ExchangeName(b.producer), e.Exchange, "the original exchange is kept across retries")
	require.Equal(t, "company.updated", e.RoutingKey)

	// The poison copy carries every contract header and the original
	// properties; listing it leaves it in place.
	list, err := consumer.ListPoison(ctx, b.conn, b.name, 10)
	require.NoError(t, err)
	require.Len(t, list, parked)
	pm := list[0] // the head of the queue: the first one parked
	require.Equal(t, ev.MessageId, pm.MessageID)
	require.Equal(t, "max-attempts", pm.Reason)
	require.Equal(t, 5, pm.Attempts)
	require.Equal(t, "attempt 5 failed: the ledger is closed", pm.LastError)
	require.WithinDuration(t, runs[ev.MessageId][0], pm.FirstFailedAt, time.Second)
	require.Equal(t, publisher.ExchangeName(b.producer), pm.Headers[publisher.HeaderOriginalExchange])
	require.Equal(t, "company.updated", pm.Headers[publisher.HeaderOriginalRouting])
	require.Equal(t, "5", pm.Headers[publisher.HeaderAttempt])
	require.NotEmpty(t, pm.Headers[publisher.HeaderFirstFailedAt])
	require.Equal(t, ev.Headers["traceparent"], pm.Headers["traceparent"])
	require.Equal(t, "3", pm.Headers["aggregate-version"])
	require.Equal(t, "corr-7", pm.CorrelationID)
	require.Equal(t, b.producer, pm.Producer)
	require.Equal(t, "company.updated", pm.EventType)
	require.Equal(t, ev.Body, pm.Body)
	require.Eventually(t, func() bool { return b.depth(t, poison) == parked }, 5*time.Second, 10*time.Millisecond, "listing put it back")

	// The same header types a consumer in another language reads.
	raw := getOne(t, b, poison)
	require.Equal(t, int64(5), raw.Headers[publisher.HeaderAttempt])
	require.Equal(t, "max-attempts", raw.Headers[publisher.HeaderPoisonReason])
	_, err = time.Parse(time.RFC3339, raw.Headers[publisher.HeaderFirstFailedAt].(string))
	require.NoError(t, err)

	// Redrive with a fixed handler: processed once.
	require.NoError(t, failing.Stop(ctx))
	b.start(t, cfg, consumer.HandlerFunc(effect))
	var progress []string
	n, err := consumer.Redrive(ctx, b.conn, b.name, 0, []string{ev.MessageId}, func(done, total int) {
		progress = append(progress, fmt.Sprintf("%d/%d", done, total))
	})
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.Equal(t, []string{"1/1"}, progress)
	require.Eventually(t, func() bool { return b.count(t, `SELECT count(*) FROM effects`) == 1 }, 10*time.Second, 10*time.Millisecond)
	e = b.entry(t, ev.MessageId)
	require.Equal(t, inbox.StatusProcessed, e.Status)
	require.Equal(t, 6, e.Attempts)
	require.Equal(t, 1, b.count(t, `SELECT attempt FROM effects`), "the attempt count starts again after a redrive")
	require.Eventually(t, func() bool { return b.depth(t, poison) == parked-1 }, 5*time.Second, 10*time.Millisecond)
}

// getOne reads the message at the head of queue and puts it back.
func getOne(t *testing.T, b *testBundle, queue string) amqp.Delivery {
	t.Helper()
	ch, err := b.conn.Channel()
	require.NoError(t, err)
	defer ch.Close()
	d, ok, err := ch.Get(queue, false)
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, d.Nack(false, true))
	return d
}

func TestMalformedDeliveriesArePoisoned(t *testing.T) {
	t.Parallel()
	b := setup(t)
	var handled int
	var mu sync.Mutex
	c := b.start(t, b.cfg, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		mu.Lock()
		handled++
		mu.Unlock()
		return effect(ctx, tx, d)
	}))

	rng := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.UintN(256))
		}
		return p
	}
	nested := amqp.Table{"int": int32(7), "big": int64(1) << 40, "float": 1.5, "bool": true, "bytes": []byte{0, 1},
		"table": amqp.Table{"deep": amqp.Table{"deeper": []any{int16(1), "x", amqp.Table{}}}}, "time": time.Unix(0, 0)}
	var evs []amqp.Publishing
	want := map[string]int{}
	for i := range 1000 {
		p := b.event(fmt.Sprintf("bad-%04d", i))
		p.Headers = nested
		switch i % 4 {
		case 0: // random bytes claimed to be JSON
			p.Body = random(1 + rng.IntN(300))
			p.Body[0] = '{'
			want["malformed"]++
		case 1: // no message_id
			p.MessageId = ""
			p.Body = random(rng.IntN(300))
			p.ContentType = "application/octet-stream"
			want["malformed"]++
		case 2: // a header in warren's reserved namespace
			p.Headers = amqp.Table{"warren.exchange": "forged", "int": int64(1), "nested": nested}
			want["malformed"]++
		case 3: // invalid UTF-8 JSON with a +json type
			p.ContentType = "application/vnd.acme+json; charset=utf-8"
			p.Body = []byte{'"', 0xff, 0xfe, '"', ','}
			want["malformed"]++
		}
		if i == 500 {
			p.Body = make([]byte, 10<<20) // 10 MiB of zeros
			p.ContentType = "application/octet-stream"
			p.MessageId = "too-large"
			want["malformed"]--
			want["too-large"]++
		}
		evs = append(evs, p)
	}
	b.publish(t, "", publisher.QueueName(b.name), evs...)

	require.Eventually(t, func() bool { return b.counts.poisoned.Load() == 1000 }, 60*time.Second, 50*time.Millisecond,
		"poisoned %d of 1000", b.counts.poisoned.Load())
	b.counts.mu.Lock()
	require.Equal(t, want, b.counts.reasons)
	b.counts.mu.Unlock()
	require.Zero(t, handled)
	require.NoError(t, c.Err(), "the consumer still runs")

	// Rows for the ones with an id, each with its reason.
	require.Equal(t, 750, b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'poisoned'`))
	require.Equal(t, 499, b.count(t, `SELECT count(*) FROM warren_inbox WHERE last_error LIKE 'malformed: the body is not valid JSON%'`))
	require.Equal(t, 250, b.count(t, `SELECT count(*) FROM warren_inbox WHERE last_error LIKE 'malformed: header "warren.exchange" uses the reserved prefix%'`))
	e := b.entry(t, "too-large")
	require.Equal(t, "too-large", e.LastError)
	require.Nil(t, e.Body, "a body over the limit is not kept")

	// A good delivery still goes through.
	b.publish(t, "", publisher.QueueName(b.name), b.event("good"))
	require.Eventually(t, func() bool { return b.count(t, `SELECT count(*) FROM effects`) == 1 }, 10*time.Second, 10*time.Millisecond)

	// Nothing left unacked: once stopped, the queue is empty.
	require.NoError(t, c.Stop(context.Background()))
	require.Zero(t, b.depth(t, publisher.QueueName(b.name)))
	require.Equal(t, 1000, b.depth(t, publisher.PoisonQueueName(b.name)))
	require.EqualValues(t, 1001, b.counts.delivered.Load(), "no delivery came twice")

	// Each poison copy says why.
	list, err := consumer.ListPoison(context.Background(), b.conn, b.name, 1000)
	require.NoError(t, err)
	require.Len(t, list, 1000)
	for _, pm := range list {
		require.True(t, strings.HasPrefix(pm.Reason, "malformed: ") || pm.Reason == "too-large", pm.Reason)
		if pm.Reason == "malformed: no message_id" {
			require.NotEmpty(t, pm.MessageID, "the poison copy gets an id of its own; its reason says it had none")
		}
	}

	// Purge drops them.
	require.Eventually(t, func() bool { return b.depth(t, publisher.PoisonQueueName(b.name)) == 1000 }, 5*time.Second, 10*time.Millisecond)
	n, err := consumer.Purge(context.Background(), b.conn, b.name)
	require.NoError(t, err)
	require.Equal(t, 1000, n)
	require.Zero(t, b.depth(t, publisher.PoisonQueueName(b.name)))
	_, err = consumer.Purge(context.Background(), b.conn, "no-such-consumer")
	require.ErrorIs(t, err, consumer.ErrTopologyMissing)
}

func TestHTTPSink(t *testing.T) {
	t.Parallel()
	b := setup(t)
	var mu sync.Mutex
	var bodies []inbox.DeliveryJSON
	var headers []http.Header
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		raw, _ := io.ReadAll(r.Body)
		var j inbox.DeliveryJSON
		if err := json.Unmarshal(raw, &j); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		bodies = append(bodies, j)
		headers = append(headers, r.Header.Clone())
		if len(bodies) == 1 {
			http.Error(w, "database is down", http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(srv.Close)
	b.start(t, b.cfg, consumer.HTTPSink(srv.URL, srv.Client(), false))

	ev := b.event("0192b3a4-0000-7000-8000-0000000000aa")
	b.publish(t, publisher.ExchangeName(b.producer), "company.updated", ev)
	require.Eventually(t, func() bool {
		e, err := inbox.Show(context.Background(), b.db, b.name, ev.MessageId)
		return err == nil && e.Status == inbox.StatusProcessed
	}, 10*time.Second, 10*time.Millisecond)

	e := b.entry(t, ev.MessageId)
	require.Equal(t, 2, e.Attempts, "one failure, then the success")
	require.Contains(t, e.LastError, "status 500")
	require.Contains(t, e.LastError, "database is down")

	mu.Lock()
	defer mu.Unlock()
	require.Len(t, bodies, 2)
	j := bodies[1]
	require.Equal(t, `{"name":"Acme"}`, j.Body)
	require.Equal(t, ev.MessageId, j.Properties.MessageID)
	require.Equal(t, b.producer, j.Properties.AppID)
	require.Equal(t, "company.updated", j.Properties.Type)
	require.EqualValues(t, 2, j.Properties.DeliveryMode)
	require.Equal(t, ev.Timestamp.Unix(), j.Properties.Timestamp)
	require.Equal(t, "42", j.Headers["aggregate-id"])
	require.Equal(t, publisher.ExchangeName(b.producer), j.Envelope.Exchange)
	require.Equal(t, "company.updated", j.Envelope.RoutingKey)
	require.NotZero(t, j.Envelope.DeliveryTag)
	require.Equal(t, ev.MessageId, headers[1].Get("Warren-Message-Id"))
	require.Equal(t, "2", headers[1].Get("Warren-Attempt"))
	require.Zero(t, b.counts.retried.Load(), "the immediate retry succeeded")
}

func TestHTTPSinkTimeout(t *testing.T) {
	t.Parallel()
	b := setup(t)
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(func() { close(release); srv.Close() })
	cfg := b.cfg
	cfg.HandlerTimeout = 200 * time.Millisecond
	cfg.ImmediateRetries = -1
	cfg.RetryDelays = []time.Duration{time.Hour}
	b.start(t, cfg, consumer.HTTPSink(srv.URL, nil, false))
	b.publish(t, "", publisher.QueueName(b.name), b.event("slow"))
	require.Eventually(t, func() bool { return b.counts.retried.Load() == 1 }, 10*time.Second, 10*time.Millisecond)
	e := b.entry(t, "slow")
	require.Equal(t, inbox.StatusRetrying, e.Status)
	require.Contains(t, e.LastError, "no answer within")
}

func TestExpiredDeliveriesArePoisoned(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := b.cfg
	cfg.Expiration = time.Minute
	b.start(t, cfg, consumer.HandlerFunc(effect))
	old := b.event("old")
	old.Timestamp = time.Now().Add(-2 * time.Minute)
	b.publish(t, "", publisher.QueueName(b.name), old, b.event("fresh"))
	require.Eventually(t, func() bool { return b.counts.poisoned.Load() == 1 && b.count(t, `SELECT count(*) FROM effects`) == 1 },
		10*time.Second, 10*time.Millisecond)
	e := b.entry(t, "old")
	require.Equal(t, inbox.StatusPoisoned, e.Status)
	require.True(t, strings.HasPrefix(e.LastError, "expired: waited 2m"), e.LastError)
	pm, err := consumer.ListPoison(context.Background(), b.conn, b.name, 0)
	require.NoError(t, err)
	require.Len(t, pm, 1)
	require.Equal(t, "expired", pm[0].Reason)
}

func TestMissingRetryQueueRequeues(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := b.cfg
	cfg.ImmediateRetries = -1
	cfg.RetryDelays = []time.Duration{time.Hour}
	failures := make(chan int, 100)
	c := b.start(t, cfg, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		failures <- d.Attempt
		return errors.New("nope")
	}))
	// Someone deletes the retry queue: the failed delivery must not be
	// dropped (the publish is mandatory), it goes back to the queue.
	testDelete(b, publisher.RetryQueueName(b.name, time.Hour))
	b.publish(t, "", publisher.QueueName(b.name), b.event("kept"))
	require.Equal(t, 1, <-failures)
	require.Equal(t, 2, <-failures, "redelivered after the retry publish failed, and counted")
	require.NoError(t, c.Stop(context.Background()))
	require.Eventually(t, func() bool { return b.depth(t, publisher.QueueName(b.name)) == 1 }, 5*time.Second, 10*time.Millisecond,
		"the delivery is back in the queue")
}

func testDelete(b *testBundle, queue string) {
	ch, err := b.conn.Channel()
	if err != nil {
		return
	}
	defer ch.Close()
	_, _ = ch.QueueDelete(queue, false, false, false)
}
