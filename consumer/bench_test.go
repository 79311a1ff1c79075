package consumer_test

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"runtime/trace"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
)

// BenchmarkConsume compares warren's consumer (inbox row per delivery,
// batched commits, synchronous=FULL) with a raw amqp091 consume-and-ack of
// the same queue type and the same prefetch, on queues holding
// WARREN_BENCH_MESSAGES messages (default 100,000). Both queues are filled
// first, then drained back to back, WARREN_BENCH_ROUNDS times (default 1);
// the figures are the medians. WARREN_BENCH_CONCURRENCY (default
// DefaultConcurrency) and WARREN_BENCH_PREFETCH (default twice the
// concurrency) set the consumer's; the raw consumer gets the same prefetch.
// WARREN_BENCH_HANDLER=func runs an application's handler (a HandlerFunc
// that writes nothing) instead of the audit-only Inbox.
// WARREN_BENCH_CPUPROFILE names a file for a CPU profile of the warren
// phase alone (the last round's), WARREN_BENCH_TRACE one for an execution
// trace of it.
//
//	go test -run '^$' -bench Consume -benchtime 1x ./consumer
func BenchmarkConsume(b *testing.B) {
	n := envInt(b, "WARREN_BENCH_MESSAGES", 100_000)
	concurrency := envInt(b, "WARREN_BENCH_CONCURRENCY", consumer.DefaultConcurrency)
	rounds := envInt(b, "WARREN_BENCH_ROUNDS", 1)
	prefetch := envInt(b, "WARREN_BENCH_PREFETCH", 2*concurrency)
	for range b.N {
		var raws, warrens, ratios []float64
		for range rounds {
			raw, warren := benchRound(b, n, concurrency, prefetch)
			raws, warrens, ratios = append(raws, raw), append(warrens, warren), append(ratios, 100*warren/raw)
			b.Logf("%d messages, concurrency %d, prefetch %d: raw amqp091 %.0f msgs/s, warren %.0f msgs/s (%.0f%% of raw)",
				n, concurrency, prefetch, raw, warren, 100*warren/raw)
		}
		b.ReportMetric(median(raws), "raw-msgs/s")
		b.ReportMetric(median(warrens), "warren-msgs/s")
		b.ReportMetric(median(ratios), "%-of-raw")
	}
}

func envInt(b *testing.B, name string, def int) int {
	if s := os.Getenv(name); s != "" {
		n, err := strconv.Atoi(s)
		require.NoError(b, err, name)
		return n
	}
	return def
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// benchRound fills a raw queue and a consumer's queue with n messages each,
// then drains the raw one with amqp091 (one channel, prefetch, an ack per
// delivery) and the consumer's with warren (the inbox-only handler), and
// returns both rates.
func benchRound(b *testing.B, n, concurrency, prefetch int) (rawRate, warrenRate float64) {
	tb := setup(b)
	ctx := context.Background()
	cfg := tb.cfg
	cfg.Concurrency = concurrency
	cfg.Prefetch = prefetch
	cfg.Hooks = consumer.Hooks{}

	body := []byte(`{"id":42,"name":"Acme Corporation","street":"1 Main Street","city":"Springfield","country":"US","vat":"US123456789","tags":["customer","gold"],"updatedBy":"alice@example.com","note":"` + strings.Repeat("x", 80) + `"}`)
	events := func(prefix string) []amqp.Publishing {
		ps := make([]amqp.Publishing, n)
		for i := range ps {
			ps[i] = tb.event(fmt.Sprintf("%s-%07d", prefix, i))
			ps[i].Body = body
		}
		return ps
	}
	raw := publisher.QueueName(tb.name) + "-raw"
	ch, err := tb.conn.Channel()
	require.NoError(b, err)
	_, err = ch.QueueDeclare(raw, true, false, false, false, amqp.Table{amqp.QueueTypeArg: string(consumer.Quorum)})
	require.NoError(b, err)
	b.Cleanup(func() { testDeleteQueue(tb, raw) })
	tb.publish(b, "", raw, events("raw")...)
	require.NoError(b, consumer.DeclareTopology(ctx, tb.conn, cfg))
	tb.publish(b, "", publisher.QueueName(tb.name), events("warren")...)

	require.NoError(b, ch.Qos(prefetch, 0, false))
	cpu0 := cpuTime()
	start := time.Now()
	ds, err := ch.Consume(raw, "", false, false, false, false, nil)
	require.NoError(b, err)
	for range n {
		d := <-ds
		require.NoError(b, d.Ack(false))
	}
	rawRate = float64(n) / time.Since(start).Seconds()
	rawCPU := cpuTime() - cpu0
	require.NoError(b, ch.Close())

	var done atomic.Int64
	finished := make(chan struct{})
	cfg.Hooks.HandlerDuration = func(time.Duration) {
		if done.Add(1) == int64(n) {
			close(finished)
		}
	}
	var handler consumer.Handler = consumer.Inbox
	if os.Getenv("WARREN_BENCH_HANDLER") == "func" {
		// An application's handler that writes nothing: the delivery
		// runs under a savepoint of its own.
		handler = consumer.HandlerFunc(func(context.Context, *sql.Tx, *consumer.Delivery) error { return nil })
	}
	c, err := consumer.New(cfg, handler)
	require.NoError(b, err)
	// The warren phase only (not the filling nor the raw consumer): a CPU
	// profile, and an execution trace of where deliveries wait (go tool
	// trace -pprof=sync|sched file).
	defer recordTo(b, "WARREN_BENCH_CPUPROFILE", pprof.StartCPUProfile, pprof.StopCPUProfile)()
	defer recordTo(b, "WARREN_BENCH_TRACE", trace.Start, trace.Stop)()
	cpu0 = cpuTime()
	start = time.Now()
	require.NoError(b, c.Start(ctx))
	select {
	case <-finished:
	case <-time.After(10 * time.Minute):
		b.Fatalf("only %d of %d handled in 10 minutes", done.Load(), n)
	}
	warrenRate = float64(n) / time.Since(start).Seconds()
	warrenCPU := cpuTime() - cpu0
	b.Logf("CPU of this process per message: raw %.0fµs, warren %.0fµs", float64(rawCPU.Microseconds())/float64(n), float64(warrenCPU.Microseconds())/float64(n))
	require.NoError(b, c.Stop(ctx))
	require.Equal(b, n, tb.count(b, `SELECT count(*) FROM warren_inbox WHERE status = 'processed'`))
	return rawRate, warrenRate
}

// recordTo starts a recording (start) into the file the environment
// variable env names, if it names one, and returns the func that stops it
// (stop) and closes the file.
func recordTo(b *testing.B, env string, start func(io.Writer) error, stop func()) func() {
	file := os.Getenv(env)
	if file == "" {
		return func() {}
	}
	f, err := os.Create(file)
	require.NoError(b, err, env)
	require.NoError(b, start(f), env)
	return func() {
		stop()
		_ = f.Close()
	}
}

// cpuTime is the CPU time (user and system) this process used so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func testDeleteQueue(b *testBundle, queue string) { testDelete(b, queue) }
