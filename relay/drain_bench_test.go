package relay

import (
	"context"
	"log/slog"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/test/testenv"
)

// BenchmarkRelayDrain drains a backlog of b.N rows (300-byte payloads, 1,000
// aggregates) through the relay in this process to a quorum queue on the
// test broker, and prints the relay's CPU time per row, user and system:
// the figure that decides the relay's share of a machine it shares with
// the broker, and the one to compare changes by (it moves less than
// events/s on a busy machine). Run it with one P, as `warren relay` runs:
//
//	go test -run '^$' -bench RelayDrain -benchtime 50000x -cpu 1 -count 3 ./relay
func BenchmarkRelayDrain(b *testing.B) {
	ctx := context.Background()
	db, path := testenv.DB(b)
	producer := testenv.Name("relaybench")
	exchange := publisher.ExchangeName(producer)
	conn := testenv.Conn(b, testenv.URL())
	quorumQueue(b, conn, exchange)
	evs := make([]outbox.Event, 0, 5000)
	for i := 0; i < b.N; i += len(evs) {
		evs = evs[:0]
		for j := i; j < min(i+5000, b.N); j++ {
			ev := partsEvent(j)
			ev.Producer = producer
			evs = append(evs, ev)
		}
		_, err := outbox.AppendDB(ctx, db, evs...)
		require.NoError(b, err)
	}
	_, err := db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`)
	require.NoError(b, err)

	pub, err := publisher.New(publisher.Config{Connection: publisher.ConnectionConfig{URL: testenv.URL()}, Logger: slog.New(slog.DiscardHandler)})
	require.NoError(b, err)
	defer func() { _ = pub.Close() }()
	require.NoError(b, pub.Connect(ctx))
	r, err := New(Config{DB: db, DBPath: path, Publisher: pub, Logger: slog.New(slog.DiscardHandler)})
	require.NoError(b, err)

	clock := startCPU()
	b.ResetTimer()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(runCtx) }()
	for r.Marked() < int64(b.N) {
		select {
		case err := <-done:
			b.Fatalf("relay stopped after %d of %d rows: %v", r.Marked(), b.N, err)
		case <-time.After(5 * time.Millisecond):
		}
	}
	b.StopTimer()
	clock.pause()
	stop()
	require.NoError(b, <-done)
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	clock.report(b, b.N)
}

// quorumQueue declares exchange and a quorum queue bound to it with "#",
// the queue warren's consumers use, and deletes both when b ends.
func quorumQueue(b *testing.B, conn *amqp.Connection, exchange string) {
	ch, err := conn.Channel()
	require.NoError(b, err)
	defer func() { _ = ch.Close() }()
	require.NoError(b, ch.ExchangeDeclare(exchange, "topic", true, false, false, false, nil))
	q := testenv.Name("relaybench-q")
	_, err = ch.QueueDeclare(q, true, false, false, false, amqp.Table{"x-queue-type": "quorum"})
	require.NoError(b, err)
	require.NoError(b, ch.QueueBind(q, "#", exchange, false, nil))
	b.Cleanup(func() { testenv.DeleteTopology("", conn, []string{exchange}, []string{q}) })
}
