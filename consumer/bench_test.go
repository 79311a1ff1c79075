package consumer_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
)

// BenchmarkConsume compares warren's consumer (inbox row per delivery,
// batched commits, synchronous=FULL) with a raw amqp091 consume-and-ack of
// the same queue type and the same prefetch, on a queue holding
// WARREN_BENCH_MESSAGES messages (default 100,000):
//
//	go test -run '^$' -bench Consume -benchtime 1x ./consumer
func BenchmarkConsume(b *testing.B) {
	n := 100_000
	if s := os.Getenv("WARREN_BENCH_MESSAGES"); s != "" {
		var err error
		n, err = strconv.Atoi(s)
		require.NoError(b, err)
	}
	concurrency := consumer.DefaultConcurrency
	if s := os.Getenv("WARREN_BENCH_CONCURRENCY"); s != "" {
		var err error
		concurrency, err = strconv.Atoi(s)
		require.NoError(b, err)
	}
	prefetch := 2 * concurrency
	for range b.N {
		tb := setup(b)
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

		// Raw: one channel, the same prefetch, ack each delivery.
		raw := publisher.QueueName(tb.name) + "-raw"
		ch, err := tb.conn.Channel()
		require.NoError(b, err)
		_, err = ch.QueueDeclare(raw, true, false, false, false, amqp.Table{amqp.QueueTypeArg: string(consumer.Quorum)})
		require.NoError(b, err)
		b.Cleanup(func() { testDeleteQueue(tb, raw) })
		tb.publish(b, "", raw, events("raw")...)
		require.NoError(b, ch.Qos(prefetch, 0, false))
		start := time.Now()
		ds, err := ch.Consume(raw, "", false, false, false, false, nil)
		require.NoError(b, err)
		for range n {
			d := <-ds
			require.NoError(b, d.Ack(false))
		}
		rawRate := float64(n) / time.Since(start).Seconds()
		require.NoError(b, ch.Close())

		// warren: the inbox-only handler.
		ctx := context.Background()
		require.NoError(b, consumer.DeclareTopology(ctx, tb.conn, cfg))
		tb.publish(b, "", publisher.QueueName(tb.name), events("warren")...)
		var done atomic.Int64
		finished := make(chan struct{})
		cfg.Hooks.HandlerDuration = func(time.Duration) {
			if done.Add(1) == int64(n) {
				close(finished)
			}
		}
		c, err := consumer.New(cfg, consumer.Inbox)
		require.NoError(b, err)
		start = time.Now()
		require.NoError(b, c.Start(ctx))
		select {
		case <-finished:
		case <-time.After(10 * time.Minute):
			b.Fatalf("only %d of %d handled in 10 minutes", done.Load(), n)
		}
		warrenRate := float64(n) / time.Since(start).Seconds()
		require.NoError(b, c.Stop(ctx))
		require.Equal(b, n, tb.count(b, `SELECT count(*) FROM warren_inbox WHERE status = 'processed'`))

		b.ReportMetric(rawRate, "raw-msgs/s")
		b.ReportMetric(warrenRate, "warren-msgs/s")
		b.ReportMetric(100*warrenRate/rawRate, "%-of-raw")
		b.Logf("%d messages, concurrency %d, prefetch %d: raw amqp091 %.0f msgs/s, warren %.0f msgs/s (%.0f%% of raw)",
			n, concurrency, prefetch, rawRate, warrenRate, 100*warrenRate/rawRate)
	}
}

func testDeleteQueue(b *testBundle, queue string) { testDelete(b, queue) }
