package consumer_test

import (
	"context"
	dbsql "database/sql"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
	"github.com/warrenmq/warren/test/testenv"
)

// metric returns the value of name{labels} in g (a histogram's count).
func metric(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	v, _ := testenv.Metric(t, g, name, labels)
	return v
}

func TestMetricsCountDeliveriesRetriesAndPoison(t *testing.T) {
	t.Parallel()
	b := setup(t)
	// A name that ends in a number, as "billing-2" does: Watermill's
	// router metrics name the consumer's handler whole. (They used to drop
	// the number, a leftover of one handler per slot, and this test failed
	// whenever testenv.Name's suffix happened to be all digits.)
	b.name += "-42"
	b.cfg.Consumer = b.name
	reg := prometheus.NewRegistry()
	m, err := consumer.NewMetrics(reg)
	require.NoError(t, err)
	cfg := b.cfg
	cfg.Metrics = m
	cfg.ImmediateRetries = -1
	cfg.MaxAttempts = 2
	cfg.RetryDelays = []time.Duration{50 * time.Millisecond}
	c := b.start(t, cfg, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		if strings.HasSuffix(d.MessageID, "9") {
			return errors.New("nines fail")
		}
		return effect(ctx, tx, d)
	}))
	name := map[string]string{"consumer": b.name}
	require.Zero(t, metric(t, reg, "warren_consumer_deliveries_total", name), "listed at 0 from the start")

	var evs []amqp.Publishing
	for i := range 30 {
		evs = append(evs, b.event(fmt.Sprintf("id-%02d", i)))
	}
	evs = append(evs, b.event("id-00")) // a duplicate
	bad := b.event("id-bad")
	bad.Body = []byte(`{not json`)
	evs = append(evs, bad)
	b.publish(t, "", publisher.QueueName(b.name), evs...)

	// 3 nines: 2 runs each, the second from the retry queue, then poison.
	require.Eventually(t, func() bool {
		return metric(t, reg, "warren_consumer_poisoned_total", name) == 4 && b.depth(t, publisher.PoisonQueueName(b.name)) == 4
	}, 20*time.Second, 20*time.Millisecond)
	require.Eventually(t, func() bool { return metric(t, reg, "warren_consumer_in_flight", name) == 0 }, 5*time.Second, 10*time.Millisecond)

	require.EqualValues(t, 32+3, metric(t, reg, "warren_consumer_deliveries_total", name), "30 + a duplicate + a malformed one + 3 retries")
	require.EqualValues(t, b.counts.delivered.Load(), metric(t, reg, "warren_consumer_deliveries_total", name), "the configured hooks still run")
	require.EqualValues(t, 1, metric(t, reg, "warren_consumer_duplicates_total", name))
	require.EqualValues(t, 3, metric(t, reg, "warren_consumer_retries_total", name))
	require.EqualValues(t, 3, metric(t, reg, "warren_consumer_poisoned_total", map[string]string{"consumer": b.name, "reason": consumer.ReasonMaxAttempts}))
	require.EqualValues(t, 1, metric(t, reg, "warren_consumer_poisoned_total", map[string]string{"consumer": b.name, "reason": consumer.ReasonMalformed}))
	require.EqualValues(t, 30+3, metric(t, reg, "warren_consumer_handler_seconds", name), "27 runs that succeeded, 6 that failed")
	require.Equal(t, 27, b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'processed'`))
	require.Equal(t, 4, b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'poisoned'`))

	handled := metric(t, reg, "watermill_handler_execution_time_seconds", map[string]string{"handler_name": "warren-" + b.name})
	require.EqualValues(t, 32+3, handled, "Watermill's router metrics, one handler name for the consumer")

	qs, err := consumer.InspectQueues(context.Background(), b.conn, b.name, cfg.RetryDelays)
	require.NoError(t, err)
	require.Equal(t, 4, qs.Poison.Ready)
	require.Equal(t, 0, qs.Queue.Ready)
	require.Equal(t, 1, qs.Queue.Consumers, "one channel reads the queue")
	require.Len(t, qs.Retry, 1)
	require.False(t, qs.Retry[0].Missing)
	other, err := consumer.InspectQueues(context.Background(), b.conn, b.name+"-none", nil)
	require.NoError(t, err)
	require.True(t, other.Queue.Missing)
	require.Len(t, other.Retry, len(consumer.DefaultRetryDelays()))

	require.NoError(t, c.Stop(context.Background()))
}

func TestHandlerRunsInASpanThatContinuesTheTrace(t *testing.T) {
	t.Parallel()
	b := setup(t)
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	defer func() { _ = tp.Shutdown(context.Background()) }()

	var mu sync.Mutex
	seen := map[string]trace.SpanContext{}
	cfg := b.cfg
	cfg.TracerProvider = tp
	b.start(t, cfg, consumer.HandlerFunc(func(ctx context.Context, tx *dbsql.Tx, d *consumer.Delivery) error {
		mu.Lock()
		seen[d.MessageID] = trace.SpanContextFromContext(ctx)
		mu.Unlock()
		return effect(ctx, tx, d)
	}))

	const parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	traced := b.event("traced")
	traced.Headers["traceparent"] = parent
	b.publish(t, "", publisher.QueueName(b.name), traced, b.event("untraced"))
	require.Eventually(t, func() bool { return len(exp.GetSpans()) == 2 }, 10*time.Second, 10*time.Millisecond)

	mu.Lock()
	defer mu.Unlock()
	in := seen["traced"]
	require.Equal(t, "0af7651916cd43dd8448eb211c80319c", in.TraceID().String(), "the handler continues the producer's trace")
	var span tracetest.SpanStub
	for _, s := range exp.GetSpans() {
		if s.SpanContext.SpanID() == in.SpanID() {
			span = s
		}
	}
	require.Equal(t, "process "+b.name, span.Name)
	require.Equal(t, trace.SpanKindConsumer, span.SpanKind)
	require.Equal(t, "b7ad6b7169203331", span.Parent.SpanID().String(), "child of the span that appended the event")
	require.True(t, span.Parent.IsRemote())

	un := seen["untraced"]
	require.True(t, un.IsValid())
	require.NotEqual(t, in.TraceID(), un.TraceID(), "no traceparent: a new trace")
}

func TestHTTPSinkSendsTheTraceOn(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(tracetest.NewInMemoryExporter()))
	defer func() { _ = tp.Shutdown(context.Background()) }()
	got := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r.Header.Get("Traceparent")
	}))
	defer srv.Close()
	cfg := b.cfg
	cfg.TracerProvider = tp
	b.start(t, cfg, consumer.HTTPSink(srv.URL, nil, false))
	ev := b.event("traced")
	ev.Headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	b.publish(t, "", publisher.QueueName(b.name), ev)
	select {
	case tp := <-got:
		require.True(t, strings.HasPrefix(tp, "00-0af7651916cd43dd8448eb211c80319c-"), tp)
		require.NotContains(t, tp, "b7ad6b7169203331", "the sink's own span is the parent")
	case <-time.After(10 * time.Second):
		t.Fatal("no POST")
	}
}

func TestReadyFollowsTheConsumer(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	cfg := b.cfg
	cfg.ProbeWait = 100 * time.Millisecond
	c, err := consumer.New(b.track(cfg), consumer.Inbox)
	require.NoError(t, err)
	require.ErrorContains(t, c.Ready(ctx), "not started")
	require.NoError(t, c.Start(ctx))
	require.NoError(t, c.Ready(ctx))

	other, err := wsql.Open(ctx, b.dbPath, wsql.Options{})
	require.NoError(t, err)
	defer other.Close()
	tx, err := other.BeginTx(ctx, nil) // holds the write lock
	require.NoError(t, err)
	require.ErrorContains(t, c.Ready(ctx), "write lock")
	require.NoError(t, tx.Rollback())
	require.NoError(t, c.Ready(ctx))

	require.NoError(t, c.Stop(ctx))
	require.ErrorContains(t, c.Ready(ctx), "stopped")
}

func TestConsumerPrunesItsProcessedRows(t *testing.T) {
	t.Parallel()
	b := setup(t)
	old := `'2026-01-01T00:00:00.000Z'`
	_, err := b.db.Exec(`INSERT INTO warren_inbox (consumer, message_id, status, first_received_at, processed_at) VALUES
		(?, 'old-processed', 'processed', `+old+`, `+old+`),
		(?, 'old-poisoned', 'poisoned', `+old+`, NULL),
		(?, 'new-processed', 'processed', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
		('someone-else', 'old-processed', 'processed', `+old+`, `+old+`)`, b.name, b.name, b.name)
	require.NoError(t, err)
	cfg := b.cfg
	cfg.Retention = 24 * time.Hour
	b.start(t, cfg, consumer.Inbox)
	require.Eventually(t, func() bool {
		return b.count(t, `SELECT count(*) FROM warren_inbox WHERE consumer = ?`, b.name) == 2
	}, 10*time.Second, 10*time.Millisecond)
	require.Equal(t, 1, b.count(t, `SELECT count(*) FROM warren_inbox WHERE consumer = ? AND message_id = 'old-poisoned'`, b.name), "poisoned rows are kept")
	require.Equal(t, 1, b.count(t, `SELECT count(*) FROM warren_inbox WHERE consumer = 'someone-else'`), "another consumer's rows are its own business")
}
