package sql_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

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
	ms, err := wsql.Migrations()
	require.NoError(t, err)
	var all []int
	for _, m := range ms {
		all = append(all, m.Version)
	}
	require.Equal(t, all, applied)
	require.Equal(t, wsql.LatestVersion(), all[len(all)-1])
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

// A database at version 1, with inbox rows, upgrades to a rowid inbox that
// keeps every row and still refuses a second row for the same message.
func TestMigrateFromVersion1KeepsTheInbox(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, err := wsql.Open(ctx, filepath.Join(t.TempDir(), "app.db"), wsql.Options{})
	require.NoError(t, err)
	defer db.Close()
	ms, err := wsql.Migrations()
	require.NoError(t, err)
	require.Equal(t, 1, ms[0].Version)
	_, err = db.Exec(ms[0].SQL)
	require.NoError(t, err)
	_, err = db.Exec(`CREATE TABLE warren_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL,
		applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))`)
	require.NoError(t, err)
	_, err = db.Exec(`INSERT INTO warren_schema (version, name) VALUES (1, ?)`, ms[0].Name)
	require.NoError(t, err)
	_, err = db.Exec(`INSERT INTO warren_inbox (consumer, message_id, producer, event_type, body, status, attempts,
		duplicates, last_attempt, last_error, first_received_at, processed_at)
		VALUES ('billing', 'm-1', 'crm', 'company.updated', x'7b7d', 'processed', 1, 2, 0, NULL, '2026-11-22T10:00:00.000Z', '2026-11-22T10:00:00.005Z'),
		       ('billing', 'm-2', 'crm', 'company.deleted', NULL, 'poisoned', 5, 0, 0, 'boom', '2026-11-22T10:00:01.000Z', NULL)`)
	require.NoError(t, err)
	require.ErrorIs(t, wsql.Check(ctx, db), wsql.ErrNotMigrated)

	applied, err := wsql.Migrate(ctx, db)
	require.NoError(t, err)
	require.Equal(t, []int{2, 3}, applied)
	require.NoError(t, wsql.Check(ctx, db))

	type row struct {
		id, typ, status string
		body            []byte
		attempts, dups  int
		lastErr         *string
		received        string
		processed       *string
	}
	rows, err := db.Query(`SELECT message_id, event_type, status, body, attempts, duplicates, last_error, first_received_at, processed_at
		FROM warren_inbox WHERE consumer = 'billing' ORDER BY message_id`)
	require.NoError(t, err)
	var got []row
	for rows.Next() {
		var r row
		require.NoError(t, rows.Scan(&r.id, &r.typ, &r.status, &r.body, &r.attempts, &r.dups, &r.lastErr, &r.received, &r.processed))
		got = append(got, r)
	}
	require.NoError(t, rows.Err())
	require.Len(t, got, 2)
	require.Equal(t, "m-1", got[0].id)
	require.Equal(t, []byte("{}"), got[0].body)
	require.Equal(t, 2, got[0].dups)
	require.Equal(t, "2026-11-22T10:00:00.005Z", *got[0].processed)
	require.Equal(t, "poisoned", got[1].status)
	require.Equal(t, "boom", *got[1].lastErr)
	require.Nil(t, got[1].body)

	_, err = db.Exec(`INSERT INTO warren_inbox (consumer, message_id, status) VALUES ('billing', 'm-1', 'processed')`)
	require.Error(t, err, "(consumer, message_id) stays unique")
	var indexes int
	require.NoError(t, db.QueryRow(`SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'warren_inbox' AND name LIKE 'warren_inbox_%'`).Scan(&indexes))
	require.Equal(t, 4, indexes, "received, status, type, prune (0003 dropped the aggregate index)")
}

// FormatTime writes the digits itself: it must agree with time.Format.
func TestFormatTimeMatchesLayout(t *testing.T) {
	t.Parallel()
	loc := time.FixedZone("x", -5*3600-30*60)
	times := []time.Time{
		time.Date(2026, 11, 22, 7, 5, 9, 123456789, time.UTC),
		time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC),
		time.Date(2024, 2, 29, 23, 30, 0, 1_000_000, loc), // another day in UTC
		time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC),      // beyond four digits: time.Format
		time.Unix(0, 0),
	}
	for i := range 1000 {
		times = append(times, time.Unix(int64(i)*7_919_993, int64(i)*1_234_567))
	}
	for _, tm := range times {
		require.Equal(t, tm.UTC().Format(wsql.TimeFormat), wsql.FormatTime(tm), "%v", tm)
	}
}

// ParseTime reads TimeFormat itself: it must agree with time.Parse, on
// good times and on every way a string of that shape can be wrong.
func TestParseTimeMatchesLayout(t *testing.T) {
	t.Parallel()
	texts := []string{
		"2026-11-22T07:05:09.123Z", "0001-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z",
		"2024-02-29T23:30:00.001Z", "2023-02-29T00:00:00.000Z", "2026-04-31T00:00:00.000Z",
		"2026-13-01T00:00:00.000Z", "2026-00-01T00:00:00.000Z", "2026-01-00T00:00:00.000Z",
		"2026-01-01T24:00:00.000Z", "2026-01-01T00:60:00.000Z", "2026-01-01T00:00:60.000Z",
		"2026-01-01T00:00:00.00xZ", "2026-1a-01T00:00:00.000Z", "2026-01-01 00:00:00.000Z",
		"+026-01-01T00:00:00.000Z", "2026-01-01T00:00:00.000X",
	}
	for i := range 1000 {
		texts = append(texts, wsql.FormatTime(time.Unix(int64(i)*7_919_993, int64(i)*1_234_567)))
	}
	for _, s := range texts {
		want, wantErr := time.Parse(wsql.TimeFormat, s)
		got, err := wsql.ParseTime(s)
		if wantErr != nil {
			// ParseTime tries other layouts too; none takes these.
			require.Error(t, err, s)
			continue
		}
		require.NoError(t, err, s)
		require.True(t, want.Equal(got), "%s: %v, want %v", s, got, want)
		require.Equal(t, time.UTC, got.Location(), s)
	}
}
