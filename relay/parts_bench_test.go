package relay

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

// The relay's parts without the broker, per outbox row, on rows shaped as
// `go tool task bench` makes them (300-byte JSON payloads, 1,000
// aggregates): reading a backlog, turning rows into AMQP publishings, and
// marking confirmed rows. Each prints the CPU time per row, user and
// system, which moves less than the wall time on a shared machine.
//
//	go test -run '^$' -bench 'Read|Publishing|Mark' -benchtime 100000x ./relay
//
// WARREN_BENCH_ROWS sets how many rows the table holds (default 50,000):
// the same parts on a deeper table.

// partsRowsDefault is how many unpublished rows partsDB appends unless
// WARREN_BENCH_ROWS says otherwise.
const partsRowsDefault = 50_000

// partsDB returns a migrated database and how many unpublished rows it
// holds (partsRows).
func partsDB(b *testing.B) (*sql.DB, int) {
	b.Helper()
	n := partsRows(b)
	ctx := context.Background()
	db, err := wsql.Open(ctx, filepath.Join(b.TempDir(), "parts.db"), wsql.Options{Synchronous: "OFF"})
	require.NoError(b, err)
	b.Cleanup(func() { _ = db.Close() })
	_, err = wsql.Migrate(ctx, db)
	require.NoError(b, err)
	evs := make([]outbox.Event, 0, 5000)
	for i := 0; i < n; i += len(evs) {
		evs = evs[:0]
		for j := i; j < min(i+5000, n); j++ {
			evs = append(evs, partsEvent(j))
		}
		_, err := outbox.AppendDB(ctx, db, evs...)
		require.NoError(b, err)
	}
	_, err = db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`)
	require.NoError(b, err)
	return db, n
}

// partsRows is how many rows partsDB appends: WARREN_BENCH_ROWS, or
// partsRowsDefault.
func partsRows(b *testing.B) int {
	v := os.Getenv("WARREN_BENCH_ROWS")
	if v == "" {
		return partsRowsDefault
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1000 {
		b.Fatalf("WARREN_BENCH_ROWS=%q: want a number of rows, at least 1000", v)
	}
	return n
}

func partsEvent(i int) outbox.Event {
	head := fmt.Sprintf(`{"company_id":"company-%06d","seq":%d,"name":"Company %06d","status":"active","country":"DE","updated_by":"bench","note":"`, i%1000, i, i%1000)
	return outbox.Event{
		Producer:      "bench",
		Type:          "company.updated",
		AggregateType: "company",
		AggregateID:   fmt.Sprint(i % 1000),
		Payload:       []byte(head + strings.Repeat("x", max(0, 300-len(head)-2)) + `"}`),
	}
}

// cpuClock measures the process's user and system CPU time while it runs
// (pause and resume leave out set-up work).
type cpuClock struct {
	r0        syscall.Rusage
	running   bool
	user, sys time.Duration
}

func startCPU() *cpuClock {
	c := &cpuClock{}
	c.resume()
	return c
}

func (c *cpuClock) resume() {
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &c.r0)
	c.running = true
}

func (c *cpuClock) pause() {
	if !c.running {
		return
	}
	var r1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &r1)
	c.user += time.Duration(r1.Utime.Nano() - c.r0.Utime.Nano())
	c.sys += time.Duration(r1.Stime.Nano() - c.r0.Stime.Nano())
	c.running = false
}

// report pauses the clock and reports its CPU time per row for n rows.
func (c *cpuClock) report(b *testing.B, n int) {
	c.pause()
	b.ReportMetric(float64(c.user.Nanoseconds())/1000/float64(n), "user-µs/row")
	b.ReportMetric(float64(c.sys.Nanoseconds())/1000/float64(n), "sys-µs/row")
}

// BenchmarkReadOutbox reads the backlog as the relay's reader does, in
// reads of DefaultBatchSize rows after a cursor, from the start again when
// it reaches the end.
func BenchmarkReadOutbox(b *testing.B) {
	db, _ := partsDB(b)
	b.ReportAllocs()
	ctx := context.Background()
	var cursor int64
	clock := startCPU()
	b.ResetTimer()
	for read := 0; read < b.N; {
		rows, err := outbox.ReadUnpublished(ctx, db, cursor, min(DefaultBatchSize, b.N-read), 0)
		require.NoError(b, err)
		if len(rows) == 0 {
			cursor = 0
			continue
		}
		cursor = rows[len(rows)-1].Seq
		read += len(rows)
	}
	b.StopTimer()
	clock.report(b, b.N)
}

// BenchmarkPublishing turns rows into the AMQP publishings the relay sends:
// straight (toPublishing, for *publisher.Publisher) and through a
// Watermill message and the Marshaler (any other Watermill publisher).
func BenchmarkPublishing(b *testing.B) {
	db, _ := partsDB(b)
	rows, err := outbox.ReadUnpublished(context.Background(), db, 0, 1000, 0)
	require.NoError(b, err)
	b.Run("prepared", func(b *testing.B) {
		b.ReportAllocs()
		clock := startCPU()
		for i := range b.N {
			_ = toPublishing(&rows[i%len(rows)])
		}
		clock.report(b, b.N)
	})
	b.Run("message", func(b *testing.B) {
		b.ReportAllocs()
		clock := startCPU()
		for i := range b.N {
			msg := toMessage(&rows[i%len(rows)])
			if _, err := (publisher.Marshaler{}).Marshal(msg); err != nil {
				b.Fatal(err)
			}
		}
		clock.report(b, b.N)
	})
}

// BenchmarkMarkPublished marks rows published as the relay's marker does:
// runs of consecutive seqs, with the marker's commit (no fsync of its
// own), in transactions of 40 to 1,280 rows (160 is 10 ms of a 16,000
// events/s drain).
func BenchmarkMarkPublished(b *testing.B) {
	for _, perTx := range []int{40, 160, 640, 1280} {
		b.Run(fmt.Sprint(perTx), func(b *testing.B) {
			db, rows := partsDB(b)
			ctx := context.Background()
			seq := int64(0)
			seqs := make([]int64, 0, perTx)
			clock := startCPU()
			b.ResetTimer()
			for done := 0; done < b.N; {
				if seq+int64(perTx) > int64(rows) {
					b.StopTimer()
					clock.pause()
					_, err := db.ExecContext(ctx, `UPDATE warren_outbox SET published_at = NULL`)
					require.NoError(b, err)
					_, err = db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`)
					require.NoError(b, err)
					seq = 0
					clock.resume()
					b.StartTimer()
				}
				seqs = seqs[:0]
				for range min(perTx, b.N-done) {
					seq++
					seqs = append(seqs, seq)
				}
				require.NoError(b, outbox.MarkPublished(ctx, db, seqs, time.Now()))
				done += len(seqs)
			}
			b.StopTimer()
			clock.report(b, b.N)
		})
	}
}
