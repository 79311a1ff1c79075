package sql_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	wsql "github.com/warrenmq/warren/sql"
)

func TestMigrateIsIdempotentAndChecked(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "app.db")
	db, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	defer db.Close()

	err = wsql.Check(ctx, db)
	require.ErrorIs(t, err, wsql.ErrNotMigrated)
	require.Contains(t, err.Error(), "warren migrate")

	applied, err := wsql.Migrate(ctx, db)
	require.NoError(t, err)
	require.Equal(t, []int{wsql.LatestVersion()}, applied)
	require.NoError(t, wsql.Check(ctx, db))

	applied, err = wsql.Migrate(ctx, db)
	require.NoError(t, err)
	require.Empty(t, applied, "second migrate must be a no-op")

	// The application's own user_version is left alone.
	var uv int
	require.NoError(t, db.QueryRow(`PRAGMA user_version`).Scan(&uv))
	require.Zero(t, uv)

	// The file, and the -wal and -shm files SQLite makes next to it, are
	// private to their owner.
	for _, f := range []string{path, path + "-wal", path + "-shm"} {
		fi, err := os.Stat(f)
		require.NoError(t, err)
		require.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), f)
	}

	var mode string
	require.NoError(t, db.QueryRow(`PRAGMA journal_mode`).Scan(&mode))
	require.Equal(t, "wal", mode)
}

func TestNewerSchemaIsRefused(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, err := wsql.Open(ctx, filepath.Join(t.TempDir(), "app.db"), wsql.Options{})
	require.NoError(t, err)
	defer db.Close()
	_, err = wsql.Migrate(ctx, db)
	require.NoError(t, err)
	_, err = db.Exec(`INSERT INTO warren_schema (version, name) VALUES (?, 'from the future')`, wsql.LatestVersion()+1)
	require.NoError(t, err)

	require.ErrorIs(t, wsql.Check(ctx, db), wsql.ErrSchemaTooNew)
	_, err = wsql.Migrate(ctx, db)
	require.ErrorIs(t, err, wsql.ErrSchemaTooNew)
	require.Contains(t, err.Error(), "upgrade warren")
}

func TestOpenErrors(t *testing.T) {
	t.Parallel()
	_, err := wsql.Open(context.Background(), "", wsql.Options{})
	require.ErrorContains(t, err, "--db")
	_, err = wsql.Open(context.Background(), filepath.Join(t.TempDir(), "missing", "dir", "app.db"), wsql.Options{})
	require.ErrorContains(t, err, "open database")
}

func TestConcurrentWritersDoNotFailBusy(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "app.db")
	db1, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	defer db1.Close()
	db2, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	defer db2.Close()
	_, err = db1.Exec(`CREATE TABLE t (n INTEGER)`)
	require.NoError(t, err)

	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		db := db1
		if w%2 == 1 {
			db = db2
		}
		go func() {
			for i := 0; i < 50; i++ {
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					errs <- err
					return
				}
				// Read then write: with deferred transactions this upgrade
				// is where SQLITE_BUSY happens; BEGIN IMMEDIATE avoids it.
				var n int
				_ = tx.QueryRow(`SELECT count(*) FROM t`).Scan(&n)
				if _, err := tx.Exec(`INSERT INTO t VALUES (?)`, n); err != nil {
					_ = tx.Rollback()
					errs <- err
					return
				}
				if err := tx.Commit(); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for w := 0; w < 8; w++ {
		require.NoError(t, <-errs)
	}
	var n int
	require.NoError(t, db1.QueryRow(`SELECT count(*) FROM t`).Scan(&n))
	require.Equal(t, 400, n)
}
