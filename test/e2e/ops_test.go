package e2e

import (
	"context"
	dbsql "database/sql"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/stretchr/testify/require"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/relay"
	"github.com/warrenmq/warren/test/proxy"
	"github.com/warrenmq/warren/test/testenv"
)

// TestTraceGoesFromAppendToHandler appends an event inside a span, relays
// it and consumes it: the consumer's handler runs in a span whose parent is
// the span that appended the event.
func TestTraceGoesFromAppendToHandler(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	defer func() { _ = tp.Shutdown(ctx) }()

	producer, app := testenv.Name("trace-p"), testenv.Name("trace-c")
	conn := testenv.Conn(t, testenv.URL())
	t.Cleanup(func() {
		testenv.DeleteTopology("", conn, []string{publisher.ExchangeName(producer)},
			[]string{app, publisher.PoisonQueueName(app), publisher.RetryQueueName(app, time.Hour)})
	})
	db, path := testenv.DB(t)

	handled := make(chan trace.SpanContext, 1)
	c, err := consumer.New(consumer.Config{
		Consumer: app, DB: db, From: []consumer.Subscription{{Producer: producer}},
		Connection: publisher.ConnectionConfig{URL: testenv.URL()}, Concurrency: 2,
		RetryDelays: []time.Duration{time.Hour}, TracerProvider: tp,
	}, consumer.HandlerFunc(func(ctx context.Context, _ *dbsql.Tx, _ *consumer.Delivery) error {
		handled <- trace.SpanContextFromContext(ctx)
		return nil
	}))
	require.NoError(t, err)
	require.NoError(t, c.Start(ctx))
	defer func() { _ = c.Stop(ctx) }()

	pub, err := publisher.New(publisher.Config{Connection: publisher.ConnectionConfig{URL: testenv.URL()}})
	require.NoError(t, err)
	defer pub.Close()
	r, err := relay.New(relay.Config{DB: db, DBPath: path, Publisher: pub})
	require.NoError(t, err)
	rctx, stopRelay := context.WithCancel(ctx)
	relayDone := make(chan error, 1)
	go func() { relayDone <- r.Run(rctx) }()
	defer func() { stopRelay(); <-relayDone }()

	// The application's code: a request span, and the event appended in it.
	reqCtx, span := tp.Tracer("shop").Start(ctx, "POST /orders")
	_, err = outbox.AppendDB(reqCtx, db, outbox.Event{Producer: producer, Type: "order.placed", Payload: []byte(`{"id":1}`)})
	require.NoError(t, err)
	span.End()

	var in trace.SpanContext
	select {
	case in = <-handled:
	case <-time.After(20 * time.Second):
		t.Fatal("the event was not handled")
	}
	require.Equal(t, span.SpanContext().TraceID(), in.TraceID(), "one trace from the request to the handler")
	var process tracetest.SpanStub
	require.Eventually(t, func() bool {
		for _, s := range exp.GetSpans() {
			if s.SpanContext.SpanID() == in.SpanID() {
				process = s
				return true
			}
		}
		return false
	}, 5*time.Second, 10*time.Millisecond)
	require.Equal(t, "process "+app, process.Name)
	require.Equal(t, span.SpanContext().SpanID(), process.Parent.SpanID(), "the consumer's span is a child of the span that appended the event")
	t.Logf("trace %s: %q (span %s) -> %q (span %s, parent %s)", in.TraceID(), "POST /orders", span.SpanContext().SpanID(),
		process.Name, process.SpanContext.SpanID(), process.Parent.SpanID())
}

var opsAddr = regexp.MustCompile(`msg="serving /metrics, /healthz and /readyz" addr=(\S+)`)

// opsURL waits for p to serve its metrics and returns the base URL.
func opsURL(t *testing.T, p *proc) string {
	t.Helper()
	p.waitOutput(t, "serving /metrics", 30*time.Second)
	m := opsAddr.FindStringSubmatch(p.out.String())
	require.NotNil(t, m, p.out.String())
	return "http://" + m[1]
}

// scrape reads every sample of base/metrics into name{labels} -> value
// (a histogram as name_count and name_sum).
func scrape(t *testing.T, base string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var parser expfmt.TextParser
	families, err := parser.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	out := map[string]float64{}
	for name, mf := range families {
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			key := name + "{" + strings.Join(ls, ",") + "}"
			switch {
			case m.Counter != nil:
				out[key] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				out[key] = m.GetGauge().GetValue()
			case m.Histogram != nil:
				out[name+"_count{"+strings.Join(ls, ",")+"}"] = float64(m.GetHistogram().GetSampleCount())
				out[name+"_sum{"+strings.Join(ls, ",")+"}"] = m.GetHistogram().GetSampleSum()
			}
		}
	}
	return out
}

func get(t *testing.T, u string) (int, string) {
	t.Helper()
	resp, err := http.Get(u)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func dbCount(t *testing.T, db *dbsql.DB, q string, args ...any) float64 {
	t.Helper()
	var n int
	require.NoError(t, db.QueryRow(q, args...).Scan(&n))
	return float64(n)
}

// TestMetricsHealthStatusAndPrune runs `warren relay` and `warren consume`
// with --metrics-addr, each through a proxy of its own, scrapes their
// metrics during the run and checks them against the database and the
// queues; cuts the broker away to see /readyz and the backlog follow; and
// checks `warren status` and the prune commands on the result.
func TestMetricsHealthStatusAndPrune(t *testing.T) {
	t.Parallel()
	producer, app := testenv.Name("ops-p"), testenv.Name("ops-c")
	conn := testenv.Conn(t, testenv.URL())
	t.Cleanup(func() {
		testenv.DeleteTopology("", conn, []string{publisher.ExchangeName(producer)},
			[]string{app, publisher.RetryQueueName(app, 100*time.Millisecond), publisher.PoisonQueueName(app)})
	})
	shop, shopPath := testenv.DB(t)
	billing, billingPath := testenv.DB(t)
	u, err := url.Parse(testenv.URL())
	require.NoError(t, err)
	relayPx, consumerPx := proxy.Start(t, u.Host), proxy.Start(t, u.Host)

	// The sink fails every delivery of a "fail" event.
	sink := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if strings.Contains(string(b), `\"fail\":true`) || strings.Contains(string(b), `"fail":true`) {
			http.Error(w, "cannot bill this one", http.StatusInternalServerError)
		}
	}))
	defer sink.Close()

	common := []string{"WARREN_HEARTBEAT=1s", "WARREN_LOG_LEVEL=info"}
	cons := startWarren(t, append(common, "WARREN_URL="+consumerPx.URL(testenv.URL())), "consume", "--db", billingPath, "--app", app,
		"--from", producer+":order.placed", "--sink", sink.URL, "--concurrency", "4", "--max-attempts", "3", "--retry-delays", "100ms",
		"--metrics-addr", "127.0.0.1:0")
	consURL := opsURL(t, cons)
	require.Eventually(t, func() bool { code, _ := get(t, consURL+"/readyz"); return code == 200 }, 30*time.Second, 50*time.Millisecond, cons.out.String())

	// 60 events the consumer is bound for (10 of them fail), 15 nobody is.
	var evs []outbox.Event
	for i := range 75 {
		ev := outbox.Event{Producer: producer, Type: "order.placed", AggregateType: "order", AggregateID: fmt.Sprint(i % 10),
			Payload: []byte(fmt.Sprintf(`{"n":%d}`, i))}
		switch {
		case i >= 60:
			ev.Type = "order.noticed"
		case i%6 == 0:
			ev.Payload = []byte(fmt.Sprintf(`{"n":%d,"fail":true}`, i))
		}
		evs = append(evs, ev)
	}
	_, err = outbox.AppendDB(context.Background(), shop, evs...)
	require.NoError(t, err)

	rel := startWarren(t, append(common, "WARREN_URL="+relayPx.URL(testenv.URL())), "relay", "--db", shopPath, "--metrics-addr", "127.0.0.1:0")
	relURL := opsURL(t, rel)

	// During the run: the outbox drains and the consumer handles or parks
	// every delivery.
	require.Eventually(t, func() bool {
		return dbCount(t, shop, `SELECT count(*) FROM warren_outbox WHERE published_at IS NULL`) == 0
	}, 30*time.Second, 20*time.Millisecond, rel.out.String())
	require.Eventually(t, func() bool {
		return dbCount(t, billing, `SELECT count(*) FROM warren_inbox WHERE status IN ('processed', 'poisoned')`) == 60
	}, 30*time.Second, 20*time.Millisecond, cons.out.String())

	p := "{producer=" + producer + "}"
	var rm map[string]float64
	require.Eventually(t, func() bool { rm = scrape(t, relURL); return rm["warren_outbox_backlog"+p] == 0 }, 5*time.Second, 100*time.Millisecond)
	published := dbCount(t, shop, `SELECT count(*) FROM warren_outbox WHERE published_at IS NOT NULL`)
	require.EqualValues(t, 75, published)
	require.Equal(t, 60.0, rm["warren_relay_published_total"+p], "routed: the 60 the consumer's queue is bound for")
	require.Equal(t, 15.0, rm["warren_relay_unroutable_total"+p])
	require.Equal(t, published, rm["warren_relay_published_total"+p]+rm["warren_relay_unroutable_total"+p], "every row marked published was confirmed")
	require.Equal(t, 0.0, rm["warren_outbox_oldest_unpublished_seconds"+p])
	require.Equal(t, 60.0, rm["warren_relay_confirm_seconds_count{}"])
	// The relay's Router messages carry up to PublishBatch rows each.
	handled := rm["watermill_handler_execution_time_seconds_count{handler_name=warren-relay,success=true}"]
	require.Positive(t, handled)
	require.LessOrEqual(t, handled, 75.0)

	c := "{consumer=" + app + "}"
	var cm map[string]float64
	poison := func() int { return testenv.QueueDepth(t, conn, publisher.PoisonQueueName(app)) }
	require.Eventually(t, func() bool { cm = scrape(t, consURL); return cm["warren_consumer_in_flight"+c] == 0 && poison() == 10 }, 10*time.Second, 50*time.Millisecond)
	processed := dbCount(t, billing, `SELECT count(*) FROM warren_inbox WHERE consumer = ? AND status = 'processed'`, app)
	poisoned := dbCount(t, billing, `SELECT count(*) FROM warren_inbox WHERE consumer = ? AND status = 'poisoned'`, app)
	require.Equal(t, 50.0, processed)
	require.Equal(t, 10.0, poisoned)
	// A failing event runs twice at once (an immediate retry), once more
	// from the retry queue, and is parked.
	require.Equal(t, 10.0, cm["warren_consumer_retries_total"+c])
	require.Equal(t, 60.0+cm["warren_consumer_retries_total"+c], cm["warren_consumer_deliveries_total"+c], "first deliveries and deliveries back from the retry queue")
	require.Equal(t, 0.0, cm["warren_consumer_duplicates_total"+c])
	require.Equal(t, poisoned, cm["warren_consumer_poisoned_total{consumer="+app+",reason=max-attempts}"])
	require.Equal(t, float64(poison()), cm["warren_consumer_poisoned_total{consumer="+app+",reason=max-attempts}"], "= the poison queue's depth")
	require.Equal(t, processed+3*poisoned, cm["warren_consumer_handler_seconds_count"+c], "every run, failed or not")
	require.Equal(t, 0, testenv.QueueDepth(t, conn, app))
	require.Equal(t, 70.0, cm["watermill_subscriber_messages_received_total{acked=acked,handler_name=warren-"+app+",subscriber_name=consumer.subscriber}"])
	t.Logf("relay: published %v, unroutable %v, confirms took %.3fs in all; consumer: deliveries %v, retries %v, poisoned %v",
		rm["warren_relay_published_total"+p], rm["warren_relay_unroutable_total"+p], rm["warren_relay_confirm_seconds_sum{}"],
		cm["warren_consumer_deliveries_total"+c], cm["warren_consumer_retries_total"+c], cm["warren_consumer_poisoned_total{consumer="+app+",reason=max-attempts}"])

	for _, base := range []string{relURL, consURL} {
		code, body := get(t, base+"/healthz")
		require.Equal(t, 200, code, body)
		code, body = get(t, base+"/readyz")
		require.Equal(t, 200, code, body)
	}

	// The broker goes away: not ready, and the backlog grows in the gauges
	// as in the database.
	relayPx.Cut()
	consumerPx.Cut()
	_, err = outbox.AppendDB(context.Background(), shop, evs[1:6]...) // 5 that succeed
	require.NoError(t, err)
	for _, base := range []string{relURL, consURL} {
		var body string
		require.Eventually(t, func() bool { var code int; code, body = get(t, base+"/readyz"); return code == 503 }, 15*time.Second, 100*time.Millisecond)
		require.Contains(t, body, "broker", body)
		t.Logf("%s/readyz while the broker is cut away: 503 %s", base, strings.TrimSpace(body))
	}
	require.Eventually(t, func() bool { rm = scrape(t, relURL); return rm["warren_outbox_backlog"+p] == 5 }, 5*time.Second, 100*time.Millisecond)
	require.Equal(t, 5.0, dbCount(t, shop, `SELECT count(*) FROM warren_outbox WHERE published_at IS NULL`))
	require.Greater(t, rm["warren_outbox_oldest_unpublished_seconds"+p], 0.0)

	relayPx.Restore()
	consumerPx.Restore()
	for _, base := range []string{relURL, consURL} {
		require.Eventually(t, func() bool { code, _ := get(t, base+"/readyz"); return code == 200 }, 60*time.Second, 100*time.Millisecond)
	}
	require.Eventually(t, func() bool { rm = scrape(t, relURL); return rm["warren_outbox_backlog"+p] == 0 }, 30*time.Second, 100*time.Millisecond)
	require.Eventually(t, func() bool {
		return dbCount(t, billing, `SELECT count(*) FROM warren_inbox WHERE status = 'processed'`) == 55
	}, 30*time.Second, 50*time.Millisecond)
	out := cons.out.String()
	require.Equal(t, 1, strings.Count(out, "subscription lost its connection to the broker"), "one line per state change:\n%s", out)
	require.Contains(t, out, "subscription reconnected to the broker")
	require.NotContains(t, out, "Channel closed, stopping ProcessMessages")

	// warren status on the consumer's database, and the relay's.
	st, code := runWarren(t, nil, "", "status", "--db", billingPath, "--url", testenv.URL(), "--app", app, "--retry-delays", "100ms", "--format", "json")
	require.Equal(t, 0, code, st)
	var status struct {
		Consumers []struct {
			Queues struct {
				Queue  consumer.QueueState   `json:"queue"`
				Retry  []consumer.QueueState `json:"retry"`
				Poison consumer.QueueState   `json:"poison"`
			} `json:"queues"`
			Inbox struct {
				Poisoned  int    `json:"poisoned"`
				LastError string `json:"last_error"`
			} `json:"inbox"`
		} `json:"consumers"`
	}
	require.NoError(t, json.Unmarshal([]byte(st), &status), st)
	require.Len(t, status.Consumers, 1)
	sc := status.Consumers[0]
	require.Equal(t, 10, sc.Queues.Poison.Ready)
	require.Equal(t, 1, sc.Queues.Queue.Consumers, "one channel reads the queue")
	require.Len(t, sc.Queues.Retry, 1)
	require.Equal(t, 10, sc.Inbox.Poisoned)
	require.Contains(t, sc.Inbox.LastError, "cannot bill this one")
	table, code := runWarren(t, nil, "", "status", "--db", shopPath, "--url", testenv.URL())
	require.Equal(t, 0, code, table)
	require.Regexp(t, `(?m)^`+producer+` +0 +- +\S+ ago +80$`, table)
	t.Logf("warren status --db shop.db:\n%s", table)

	// Pruning on demand.
	out, code = runWarren(t, nil, "", "outbox", "prune", "--db", shopPath, "--outbox-retention", "1ms", "--dry-run")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "would delete 80 published outbox rows older than 1ms")
	out, code = runWarren(t, nil, "", "inbox", "prune", "--db", billingPath, "--app", app, "--inbox-retention", "1ms", "--format", "json")
	require.Equal(t, 0, code, out)
	var pr struct {
		Rows   int  `json:"rows"`
		DryRun bool `json:"dry_run"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &pr), out)
	require.False(t, pr.DryRun)
	require.EqualValues(t, 55, pr.Rows, "processed rows only")
	require.Equal(t, poisoned, dbCount(t, billing, `SELECT count(*) FROM warren_inbox`), "poisoned rows are kept")

	var wg sync.WaitGroup
	for _, pr := range []*proc{rel, cons} {
		wg.Go(func() {
			pr.signal(syscall.SIGTERM)
			require.Equal(t, 0, pr.wait(30*time.Second), pr.out.String())
		})
	}
	wg.Wait()
}

func TestRetentionAndMetricsSettings(t *testing.T) {
	t.Parallel()
	_, migrated := testenv.DB(t)
	oneLineError(t, nil, "", []string{"relay", "--db", migrated, "--outbox-retention", "7x"}, "--outbox-retention", "7d")
	oneLineError(t, []string{"WARREN_INBOX_RETENTION=-3d"}, "", []string{"inbox", "prune", "--db", migrated}, "WARREN_INBOX_RETENTION")
	oneLineError(t, nil, "", []string{"outbox", "prune", "--db", migrated, "--outbox-retention", "0"}, "forever")
	oneLineError(t, nil, "", []string{"relay", "--db", migrated, "--metrics-addr", "256.0.0.1:x"}, "--metrics-addr")
	out, code := runWarren(t, nil, "", "relay", "--help")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "--outbox-retention duration")
	require.Contains(t, out, "(default 7d)")
	out, code = runWarren(t, []string{"WARREN_OUTBOX_RETENTION=36h"}, "", "outbox", "prune", "--db", migrated, "--dry-run", "--format", "json")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, `"retention": "36h"`)
	require.Contains(t, out, `"rows": 0`)
}
