package sql_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	wsql "github.com/warrenmq/warren/sql"
)

func TestProbeWrite(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "app.db")
	db, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	defer db.Close()
	db.SetMaxOpenConns(1) // the probe must hand back the one connection as it found it
	_, err = db.Exec(`CREATE TABLE t (n INTEGER)`)
	require.NoError(t, err)

	require.NoError(t, wsql.ProbeWrite(ctx, db, 100*time.Millisecond))
	var busy int
	require.NoError(t, db.QueryRow(`PRAGMA busy_timeout`).Scan(&busy))
	require.Equal(t, int(wsql.DefaultBusyTimeout.Milliseconds()), busy, "busy timeout restored")
	_, err = db.Exec(`INSERT INTO t VALUES (1)`)
	require.NoError(t, err, "no transaction left open")

	// Another process holds the write lock: the probe waits as long as it
	// was told, then says so.
	other, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	defer other.Close()
	tx, err := other.BeginTx(ctx, nil) // BEGIN IMMEDIATE
	require.NoError(t, err)
	start := time.Now()
	err = wsql.ProbeWrite(ctx, db, 200*time.Millisecond)
	took := time.Since(start)
	require.Error(t, err)
	require.True(t, wsql.IsBusy(errors.Unwrap(err)) || wsql.IsBusy(err), "%v", err)
	require.Contains(t, err.Error(), "write lock")
	require.GreaterOrEqual(t, took, 150*time.Millisecond)
	require.Less(t, took, 3*time.Second)
	require.NoError(t, tx.Rollback())
	require.NoError(t, wsql.ProbeWrite(ctx, db, 200*time.Millisecond))

	// A database that cannot be written.
	ro, err := wsql.Open(ctx, path, wsql.Options{ReadOnly: true})
	require.NoError(t, err)
	defer ro.Close()
	require.Error(t, wsql.ProbeWrite(ctx, ro, 100*time.Millisecond))
}

func TestProbeWriteOnAReadOnlyFile(t *testing.T) {
	t.Parallel()
	if os.Geteuid() == 0 {
		t.Skip("root writes read-only files")
	}
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "app.db")
	db, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	require.NoError(t, db.Close())
	require.NoError(t, os.Chmod(path, 0o400))
	db, err = wsql.Open(ctx, path, wsql.Options{})
	if err != nil {
		return // refused at open: as good
	}
	defer db.Close()
	require.Error(t, wsql.ProbeWrite(ctx, db, 100*time.Millisecond))
}

func TestPruneBatchesLeavesTheLockToOthers(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	var steps, rows atomic.Int64
	total := int64(2500)
	n, err := wsql.PruneBatches(ctx, 1000, func(ctx context.Context, limit int) (int64, error) {
		steps.Add(1)
		require.LessOrEqual(t, limit, 1000)
		left := total - rows.Load()
		d := min(int64(limit), left)
		rows.Add(d)
		return d, nil
	})
	require.NoError(t, err)
	require.Equal(t, total, n)
	require.Greater(t, steps.Load(), int64(3), "starts small and grows")

	// A slow step halves the batch.
	var limits []int
	_, err = wsql.PruneBatches(ctx, 1000, func(ctx context.Context, limit int) (int64, error) {
		limits = append(limits, limit)
		if len(limits) == 3 {
			return 0, nil
		}
		time.Sleep(60 * time.Millisecond)
		return int64(limit), nil
	})
	require.NoError(t, err)
	require.Equal(t, []int{100, 50, 25}, limits)

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = wsql.PruneBatches(cctx, 10, func(context.Context, int) (int64, error) { return 10, nil })
	require.ErrorIs(t, err, context.Canceled)
}
