package sql

import (
	"context"
	dbsql "database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	sqlite3 "github.com/mattn/go-sqlite3"
)

//go:embed migrations/sqlite/*.sql
var sqliteMigrations embed.FS

// TimeFormat is how warren stores times: UTC, RFC 3339 with milliseconds.
// SQLite's strftime('%Y-%m-%dT%H:%M:%fZ', 'now') writes the same shape, so
// text comparison orders times correctly.
const TimeFormat = "2006-01-02T15:04:05.000Z"

// FormatTime formats t in TimeFormat (UTC). The consumer stamps two times
// per delivery and the relay one per mark: it writes the digits itself,
// which costs a tenth of time.Format's layout walk.
func FormatTime(t time.Time) string {
	t = t.UTC()
	year, month, day := t.Date()
	if year < 0 || year > 9999 {
		return t.Format(TimeFormat)
	}
	hour, minute, sec := t.Clock()
	milli := t.Nanosecond() / int(time.Millisecond)
	var b [24]byte
	put := func(i, v, n int) {
		for j := i + n - 1; j >= i; j-- {
			b[j] = byte('0' + v%10)
			v /= 10
		}
	}
	put(0, year, 4)
	b[4] = '-'
	put(5, int(month), 2)
	b[7] = '-'
	put(8, day, 2)
	b[10] = 'T'
	put(11, hour, 2)
	b[13] = ':'
	put(14, minute, 2)
	b[16] = ':'
	put(17, sec, 2)
	b[19] = '.'
	put(20, milli, 3)
	b[23] = 'Z'
	return string(b[:])
}

// ParseTime parses a time stored by warren or by SQLite's strftime. It also
// accepts RFC 3339 and "YYYY-MM-DD HH:MM:SS" (SQLite's CURRENT_TIMESTAMP), so
// rows written by hand in other languages read back.
func ParseTime(s string) (time.Time, error) {
	if t, ok := parseTimeFormat(s); ok {
		return t, nil
	}
	for _, layout := range []string{TimeFormat, time.RFC3339Nano, "2006-01-02 15:04:05.999999999", "2006-01-02 15:04:05"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, fmt.Errorf("parse time %q: not RFC 3339", s)
}

// parseTimeFormat parses s when it is exactly in TimeFormat, as every time
// warren writes is: the relay parses one per row it reads, and walking
// time.Parse's layouts costs ten times as much. Anything else (another
// shape, a field out of range) is left to time.Parse.
func parseTimeFormat(s string) (time.Time, bool) {
	if len(s) != len(TimeFormat) || s[4] != '-' || s[7] != '-' || s[10] != 'T' ||
		s[13] != ':' || s[16] != ':' || s[19] != '.' || s[23] != 'Z' {
		return time.Time{}, false
	}
	num := func(i, n int) int {
		v := 0
		for _, c := range []byte(s[i : i+n]) {
			if c < '0' || c > '9' {
				return -1
			}
			v = v*10 + int(c-'0')
		}
		return v
	}
	year, month, day := num(0, 4), num(5, 2), num(8, 2)
	hour, minute, sec, milli := num(11, 2), num(14, 2), num(17, 2), num(20, 3)
	if year < 0 || month < 1 || month > 12 || day < 1 || day > 31 || hour < 0 || hour > 23 ||
		minute < 0 || minute > 59 || sec < 0 || sec > 59 || milli < 0 {
		return time.Time{}, false
	}
	t := time.Date(year, time.Month(month), day, hour, minute, sec, milli*int(time.Millisecond), time.UTC)
	if t.Day() != day { // 31 April and the like: time.Parse says why
		return time.Time{}, false
	}
	return t, true
}

// Sentinel errors that callers test with errors.Is.
var (
	// ErrNotMigrated means the warren tables are missing or behind this
	// version of warren.
	ErrNotMigrated = errors.New("database is not migrated: run `warren migrate`")
	// ErrSchemaTooNew means a newer warren migrated the database.
	ErrSchemaTooNew = errors.New("database schema is newer than this warren")
)

// DefaultBusyTimeout is how long a connection waits for SQLite's write lock
// before it fails with SQLITE_BUSY.
const DefaultBusyTimeout = 10 * time.Second

// Options tune Open. The zero value is what warren uses.
type Options struct {
	// BusyTimeout is how long a writer waits for the lock. Default: DefaultBusyTimeout.
	BusyTimeout time.Duration
	// Synchronous is SQLite's synchronous pragma. warren's default, FULL,
	// makes a commit survive power loss, which the inbox needs: the
	// consumer acks after the commit. Default: "FULL".
	Synchronous string
	// ReadOnly opens the file read-only (audit queries).
	ReadOnly bool
}

// Open opens (creating if needed, with mode 0600) the SQLite database at
// file with the pragmas warren relies on: WAL journal, a busy timeout,
// BEGIN IMMEDIATE for every transaction so writers queue on the busy
// timeout instead of failing with SQLITE_BUSY on lock upgrade, foreign keys.
//
// The application may open its database itself; it then needs the same
// settings (see DSN).
func Open(ctx context.Context, file string, opts Options) (*dbsql.DB, error) {
	if file == "" {
		return nil, errors.New("open database: no file given (set --db or WARREN_DB)")
	}
	if !opts.ReadOnly {
		// Create the file ourselves so that it is not readable by others;
		// SQLite gives its -wal and -shm files the same mode.
		f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			hint := ""
			if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS) {
				hint = " (warren must write the database: the file, its folder or the file system is read-only)"
			}
			return nil, fmt.Errorf("open database %s: %w%s", file, err, hint)
		}
		_ = f.Close()
	} else if _, err := os.Stat(file); err != nil {
		return nil, fmt.Errorf("open database %s: %w", file, err)
	}
	db, err := dbsql.Open("sqlite3", DSN(file, opts))
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", file, err)
	}
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open database %s: %w", file, err)
	}
	return db, nil
}

// DSN returns the go-sqlite3 data source name that Open uses for file.
func DSN(file string, opts Options) string {
	busy := opts.BusyTimeout
	if busy <= 0 {
		busy = DefaultBusyTimeout
	}
	syncMode := opts.Synchronous
	if syncMode == "" {
		syncMode = "FULL"
	}
	q := url.Values{}
	q.Set("_journal_mode", "WAL")
	q.Set("_busy_timeout", strconv.FormatInt(busy.Milliseconds(), 10))
	q.Set("_txlock", "immediate")
	q.Set("_foreign_keys", "on")
	q.Set("_synchronous", syncMode)
	// Keep prepared statements per connection: the relay reads the outbox
	// after every commit, and preparing the query costs more than running
	// it.
	q.Set("_stmt_cache_size", "32")
	if opts.ReadOnly {
		q.Set("mode", "ro")
	}
	return "file:" + file + "?" + q.Encode()
}

// IsBusy reports whether err is SQLite's "database is locked" or "busy".
func IsBusy(err error) bool {
	var se sqlite3.Error
	if errors.As(err, &se) {
		return se.Code == sqlite3.ErrBusy || se.Code == sqlite3.ErrLocked
	}
	return false
}

// Migration is one embedded schema step.
type Migration struct {
	Version int
	Name    string
	SQL     string
}

// Migrations returns the embedded SQLite migrations in version order.
func Migrations() ([]Migration, error) {
	entries, err := fs.ReadDir(sqliteMigrations, "migrations/sqlite")
	if err != nil {
		return nil, fmt.Errorf("read embedded migrations: %w", err)
	}
	var out []Migration
	for _, e := range entries {
		name := e.Name()
		prefix, rest, ok := strings.Cut(name, "_")
		if !ok || !strings.HasSuffix(name, ".sql") {
			return nil, fmt.Errorf("embedded migration %s: name is not NNNN_name.sql", name)
		}
		v, err := strconv.Atoi(prefix)
		if err != nil {
			return nil, fmt.Errorf("embedded migration %s: %w", name, err)
		}
		body, err := fs.ReadFile(sqliteMigrations, path.Join("migrations/sqlite", name))
		if err != nil {
			return nil, fmt.Errorf("read embedded migration %s: %w", name, err)
		}
		out = append(out, Migration{Version: v, Name: strings.TrimSuffix(rest, ".sql"), SQL: string(body)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out, nil
}

// LatestVersion is the schema version this warren migrates to.
func LatestVersion() int {
	ms, err := Migrations()
	if err != nil || len(ms) == 0 {
		return 0
	}
	return ms[len(ms)-1].Version
}

const createSchemaTable = `CREATE TABLE IF NOT EXISTS warren_schema (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)`

// Version returns the schema version recorded in db: 0 when warren never
// migrated it.
func Version(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *dbsql.Row
}) (int, error) {
	var exists int
	err := q.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'warren_schema'`).Scan(&exists)
	if err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	if exists == 0 {
		return 0, nil
	}
	var v dbsql.NullInt64
	if err := q.QueryRowContext(ctx, `SELECT max(version) FROM warren_schema`).Scan(&v); err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	return int(v.Int64), nil
}

// Check returns nil when db is at exactly the schema version of this warren,
// ErrNotMigrated (wrapped, naming `warren migrate`) when it is behind, and
// ErrSchemaTooNew when a newer warren migrated it.
func Check(ctx context.Context, db *dbsql.DB) error {
	v, err := Version(ctx, db)
	if err != nil {
		return err
	}
	latest := LatestVersion()
	switch {
	case v == latest:
		return nil
	case v > latest:
		return fmt.Errorf("%w: it is at version %d, this warren knows up to %d; upgrade warren", ErrSchemaTooNew, v, latest)
	default:
		return fmt.Errorf("%w (schema version %d, want %d)", ErrNotMigrated, v, latest)
	}
}

// Migrate applies the pending migrations to db, each in its own immediate
// transaction. Running it again is a no-op; a database migrated by a newer
// warren is refused with ErrSchemaTooNew and left untouched. It returns the
// versions it applied.
func Migrate(ctx context.Context, db *dbsql.DB) ([]int, error) {
	ms, err := Migrations()
	if err != nil {
		return nil, err
	}
	var applied []int
	for _, m := range ms {
		done, err := migrateOne(ctx, db, m, ms[len(ms)-1].Version)
		if err != nil {
			return applied, err
		}
		if done {
			applied = append(applied, m.Version)
		}
	}
	return applied, nil
}

func migrateOne(ctx context.Context, db *dbsql.DB, m Migration, latest int) (bool, error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("migrate to %d: begin: %w", m.Version, err)
	}
	defer func() { _ = tx.Rollback() }()
	if _, err := tx.ExecContext(ctx, createSchemaTable); err != nil {
		return false, fmt.Errorf("migrate: create warren_schema: %w", err)
	}
	v, err := Version(ctx, tx)
	if err != nil {
		return false, err
	}
	if v > latest {
		return false, fmt.Errorf("migrate: %w: it is at version %d, this warren knows up to %d; upgrade warren", ErrSchemaTooNew, v, latest)
	}
	if v >= m.Version {
		return false, nil
	}
	if _, err := tx.ExecContext(ctx, m.SQL); err != nil {
		return false, fmt.Errorf("migrate to %d (%s): %w", m.Version, m.Name, err)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO warren_schema (version, name) VALUES (?, ?)`, m.Version, m.Name); err != nil {
		return false, fmt.Errorf("migrate to %d: record version: %w", m.Version, err)
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("migrate to %d: commit: %w", m.Version, err)
	}
	return true, nil
}
