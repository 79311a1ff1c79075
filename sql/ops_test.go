package sql_test

import (
	"context"
	dbsql "database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	wsql "github.com/warrenmq/warren/sql"
)

// openTable opens a new database file with warren's pragmas, with at most
// conns connections and one table t of the given columns, and returns it
// and the file's path.
func openTable(t *testing.T, conns int, columns string) (*dbsql.DB, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "app.db")
	db, err := wsql.Open(context.Background(), path, wsql.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	db.SetMaxOpenConns(conns)
	_, err = db.Exec(`CREATE TABLE t (` + columns + `)`)
	require.NoError(t, err)
	return db, path
}

func TestProbeWrite(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, path := openTable(t, 1, `n INTEGER`) // the probe must hand back the one connection as it found it

	require.NoError(t, wsql.ProbeWrite(ctx, db, 100*time.Millisecond))
	var busy int
	require.NoError(t, db.QueryRow(`PRAGMA busy_timeout`).Scan(&busy))
	require.Equal(t, int(wsql.DefaultBusyTimeout.Milliseconds()), busy, "busy timeout restored")
	_, err := db.Exec(`INSERT INTO t VALUES (1)`)
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

// A writer that commits constantly, holding the lock for a millisecond and
// leaving it free for a fraction of one, does not keep WriteTx out: it
// finds the gaps. (SQLite's own busy handler sleeps up to 100 ms between
// tries and can lose to such a writer for seconds.)
func TestWriteTxFindsTheGapsOfABusyWriter(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, path := openTable(t, 1, `who TEXT`) // WriteTx must hand back the one connection as it found it

	app, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	defer app.Close()
	stop := make(chan struct{})
	var commits atomic.Int64
	appDone := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				appDone <- nil
				return
			default:
			}
			tx, err := app.BeginTx(ctx, nil)
			if err != nil {
				appDone <- err
				return
			}
			if _, err := tx.Exec(`INSERT INTO t VALUES ('app')`); err != nil {
				appDone <- err
				return
			}
			time.Sleep(time.Millisecond)
			if err := tx.Commit(); err != nil {
				appDone <- err
				return
			}
			commits.Add(1)
			time.Sleep(100 * time.Microsecond)
		}
	}()
	for commits.Load() < 20 {
		time.Sleep(time.Millisecond)
	}

	for range 5 {
		start := time.Now()
		err := wsql.WriteTx(ctx, db, 5*time.Second, func(tx *dbsql.Tx) error {
			_, err := tx.Exec(`INSERT INTO t VALUES ('relay')`)
			return err
		})
		require.NoError(t, err)
		t.Logf("WriteTx took the lock after %s while the application committed", time.Since(start).Round(10*time.Microsecond))
	}
	before := commits.Load()
	for commits.Load() < before+20 {
		time.Sleep(time.Millisecond)
	}
	close(stop)
	require.NoError(t, <-appDone)

	var n int
	require.NoError(t, db.QueryRow(`SELECT count(*) FROM t WHERE who = 'relay'`).Scan(&n))
	require.Equal(t, 5, n)
	var busy int
	require.NoError(t, db.QueryRow(`PRAGMA busy_timeout`).Scan(&busy))
	require.Equal(t, int(wsql.DefaultBusyTimeout.Milliseconds()), busy, "busy timeout restored")

	// fn's error rolls back; a lock held throughout runs the wait out.
	boom := errors.New("boom")
	require.ErrorIs(t, wsql.WriteTx(ctx, db, time.Second, func(tx *dbsql.Tx) error {
		_, err := tx.Exec(`INSERT INTO t VALUES ('rolled back')`)
		require.NoError(t, err)
		return boom
	}), boom)
	require.NoError(t, db.QueryRow(`SELECT count(*) FROM t WHERE who = 'rolled back'`).Scan(&n))
	require.Zero(t, n)
	tx, err := app.BeginTx(ctx, nil)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback() }()
	err = wsql.WriteTx(ctx, db, 100*time.Millisecond, func(*dbsql.Tx) error { return nil })
	require.Error(t, err)
	require.True(t, wsql.IsBusy(err), "%v", err)
	require.Contains(t, err.Error(), "write lock")
}

// WriteTxNoSync commits at synchronous=NORMAL and hands the connection
// back at the level it had (the pool may be the application's).
func TestWriteTxNoSync(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, path := openTable(t, 1, `n INTEGER`)

	var during, after, busy int
	require.NoError(t, wsql.WriteTxNoSync(ctx, db, time.Second, func(tx *dbsql.Tx) error {
		if err := tx.QueryRow(`PRAGMA synchronous`).Scan(&during); err != nil {
			return err
		}
		_, err := tx.Exec(`INSERT INTO t VALUES (1)`)
		return err
	}))
	require.Equal(t, 1, during, "NORMAL while the transaction runs")
	require.NoError(t, db.QueryRow(`PRAGMA synchronous`).Scan(&after))
	require.Equal(t, 2, after, "FULL again afterwards")
	require.NoError(t, db.QueryRow(`PRAGMA busy_timeout`).Scan(&busy))
	require.Equal(t, int(wsql.DefaultBusyTimeout.Milliseconds()), busy)

	// A failing fn rolls back and restores the level too.
	boom := errors.New("boom")
	err := wsql.WriteTxNoSync(ctx, db, time.Second, func(tx *dbsql.Tx) error {
		if _, err := tx.Exec(`INSERT INTO t VALUES (2)`); err != nil {
			return err
		}
		return boom
	})
	require.ErrorIs(t, err, boom)
	require.NoError(t, db.QueryRow(`PRAGMA synchronous`).Scan(&after))
	require.Equal(t, 2, after)

	// The commit is visible to another connection.
	other, err := wsql.Open(ctx, path, wsql.Options{ReadOnly: true})
	require.NoError(t, err)
	defer other.Close()
	var n int
	require.NoError(t, other.QueryRow(`SELECT count(*) FROM t`).Scan(&n))
	require.Equal(t, 1, n)
}

// A Writer keeps one connection with the busy timeout 0 for its
// transactions, finds the gaps of another writer as WriteTx does, gives up
// after the wait, and hands the connection back as it found it.
func TestWriterKeepsOneConnectionForItsTransactions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, path := openTable(t, 2, `who TEXT`)
	app, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	defer app.Close()

	w := wsql.NewWriter(db)
	for i := range 3 {
		tx, err := w.Begin(ctx, time.Second)
		require.NoError(t, err)
		var busy int
		require.NoError(t, tx.QueryRow(`PRAGMA busy_timeout`).Scan(&busy))
		require.Zero(t, busy, "the Writer's connection polls for the lock itself")
		_, err = tx.Exec(`INSERT INTO t VALUES (?)`, fmt.Sprint("writer ", i))
		require.NoError(t, err)
		require.NoError(t, tx.Commit())
	}
	require.Equal(t, 1, db.Stats().InUse, "one connection, held between transactions")

	// Another writer holds the lock for 50 ms: Begin waits for it.
	held, err := app.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = held.Exec(`INSERT INTO t VALUES ('app')`)
	require.NoError(t, err)
	go func() {
		time.Sleep(50 * time.Millisecond)
		_ = held.Commit()
	}()
	start := time.Now()
	tx, err := w.Begin(ctx, 5*time.Second)
	require.NoError(t, err)
	require.GreaterOrEqual(t, time.Since(start), 40*time.Millisecond)
	require.NoError(t, tx.Rollback())

	// Held throughout: Begin gives up after the wait.
	held, err = app.BeginTx(ctx, nil)
	require.NoError(t, err)
	defer func() { _ = held.Rollback() }()
	_, err = w.Begin(ctx, 100*time.Millisecond)
	require.Error(t, err)
	require.True(t, wsql.IsBusy(err), "%v", err)
	require.Contains(t, err.Error(), "write lock")
	require.NoError(t, held.Rollback())

	w.Close()
	require.Zero(t, db.Stats().InUse, "the connection is back in the pool")
	var busy int
	require.NoError(t, db.QueryRow(`PRAGMA busy_timeout`).Scan(&busy))
	require.Equal(t, int(wsql.DefaultBusyTimeout.Milliseconds()), busy, "busy timeout restored")
	var n int
	require.NoError(t, db.QueryRow(`SELECT count(*) FROM t WHERE who LIKE 'writer %'`).Scan(&n))
	require.Equal(t, 3, n)

	// A Begin after Close takes a connection again.
	tx, err = w.Begin(ctx, time.Second)
	require.NoError(t, err)
	require.NoError(t, tx.Rollback())
	w.Close()
}
