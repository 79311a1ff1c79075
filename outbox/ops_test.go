package outbox_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/warrenmq/warren/outbox"
	wsql "github.com/warrenmq/warren/sql"
	"github.com/warrenmq/warren/test/testenv"
)

func TestAppendStoresTheTraceparentOfTheContext(t *testing.T) {
	t.Parallel()
	db, _ := testenv.DB(t)
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(tracetest.NewInMemoryExporter()))
	defer func() { _ = tp.Shutdown(context.Background()) }()
	ctx, span := tp.Tracer("test").Start(context.Background(), "checkout")
	sc := span.SpanContext()

	given := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	ids, err := outbox.AppendDB(ctx, db,
		outbox.Event{Producer: "shop", Type: "order.placed", Payload: []byte(`{}`)},
		outbox.Event{Producer: "shop", Type: "order.placed", Payload: []byte(`{}`), Traceparent: given})
	require.NoError(t, err)
	span.End()
	_, err = outbox.AppendDB(context.Background(), db, outbox.Event{Producer: "shop", Type: "order.placed", Payload: []byte(`{}`)})
	require.NoError(t, err)

	rows, err := outbox.ReadUnpublished(context.Background(), db, 0, 10, 0)
	require.NoError(t, err)
	require.Len(t, rows, 3)
	require.Equal(t, ids[0], rows[0].EventID)
	require.Equal(t, fmt.Sprintf("00-%s-%s-01", sc.TraceID(), sc.SpanID()), rows[0].Traceparent, "from the context's span")
	require.Equal(t, given, rows[1].Traceparent, "an explicit traceparent wins")
	require.Empty(t, rows[2].Traceparent, "no span, no traceparent")
}

func TestBacklogReadsOnlyUnpublishedRows(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, _ := testenv.DB(t)
	st, err := outbox.Backlog(ctx, db)
	require.NoError(t, err)
	require.Empty(t, st)

	var evs []outbox.Event
	for i := range 30 {
		evs = append(evs, outbox.Event{Producer: []string{"crm", "shop"}[i%2], Type: "x.y", Payload: []byte(`{}`)})
	}
	_, err = outbox.AppendDB(ctx, db, evs...)
	require.NoError(t, err)
	_, err = db.Exec(`UPDATE warren_outbox SET created_at = '2026-01-01T00:00:00.000Z' WHERE seq = 2`)
	require.NoError(t, err)
	rows, err := outbox.ReadUnpublished(ctx, db, 0, 100, 0)
	require.NoError(t, err)
	var crm []int64
	for _, r := range rows {
		if r.Producer == "crm" {
			crm = append(crm, r.Seq)
		}
	}
	require.NoError(t, outbox.MarkPublished(ctx, db, crm, time.Now()))

	st, err = outbox.Backlog(ctx, db)
	require.NoError(t, err)
	require.Len(t, st, 1)
	require.Equal(t, "shop", st[0].Producer)
	require.EqualValues(t, 15, st[0].Backlog)
	require.Equal(t, time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), st[0].OldestUnpublished)
	require.Zero(t, st[0].Published, "Backlog does not count published rows")

	var plan strings.Builder
	qrows, err := db.Query(`EXPLAIN QUERY PLAN SELECT producer, count(*), min(seq) FROM warren_outbox INDEXED BY warren_outbox_unpublished
		WHERE published_at IS NULL GROUP BY producer`)
	require.NoError(t, err)
	for qrows.Next() {
		var id, parent, notused int
		var detail string
		require.NoError(t, qrows.Scan(&id, &parent, &notused, &detail))
		plan.WriteString(detail + "\n")
	}
	require.NoError(t, qrows.Close())
	require.Contains(t, plan.String(), "warren_outbox_unpublished", "reads the partial index")
}

// TestPruneDoesNotHoldUpWriters prunes many rows while another connection
// appends events, and measures how long each append waited.
func TestPruneDoesNotHoldUpWriters(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, path := testenv.DB(t)
	const n = 30000
	_, err := db.ExecContext(ctx, `WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < ?)
		INSERT INTO warren_outbox (event_id, producer, event_type, aggregate_id, headers, payload, created_at, published_at)
		SELECT 'old-' || n, 'crm', 'company.updated', n % 100, '{"tenant":"acme"}', randomblob(300),
			'2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.000Z' FROM i`, n)
	require.NoError(t, err)
	app, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	defer app.Close()

	// appendWhile appends an event every 2 ms until f returns, and returns
	// the slowest append and how many there were.
	appendWhile := func(f func()) (worst time.Duration, appends int) {
		var wg sync.WaitGroup
		stop := make(chan struct{})
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Millisecond):
				}
				start := time.Now()
				_, err := outbox.AppendDB(ctx, app, outbox.Event{Producer: "crm", Type: "company.updated", Payload: []byte(`{}`)})
				if err != nil {
					t.Error(err)
					return
				}
				worst = max(worst, time.Since(start))
				appends++
			}
		})
		f()
		close(stop)
		wg.Wait()
		return worst, appends
	}
	base, baseN := appendWhile(func() { time.Sleep(300 * time.Millisecond) })
	var deleted int64
	start := time.Now()
	worst, appends := appendWhile(func() { deleted, err = outbox.Prune(ctx, db, time.Now().Add(-time.Hour), 0, false) })
	took := time.Since(start)
	t.Logf("without pruning: %d appends, the slowest took %s", baseN, base.Round(time.Millisecond))
	t.Logf("pruned %d rows in %s; %d appends meanwhile, the slowest took %s", deleted, took.Round(time.Millisecond), appends, worst.Round(time.Millisecond))
	require.NoError(t, err)
	require.EqualValues(t, n, deleted)
	// An append waits for one batch at most; a commit here costs an fsync
	// (a few ms, more on a busy disk).
	require.Less(t, worst, 500*time.Millisecond)
	var left int
	require.NoError(t, db.QueryRow(`SELECT count(*) FROM warren_outbox WHERE published_at IS NOT NULL`).Scan(&left))
	require.Zero(t, left)
}
