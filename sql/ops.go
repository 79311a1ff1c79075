package sql

import (
	"context"
	dbsql "database/sql"
	"database/sql/driver"
	"fmt"
	"time"
)

// DefaultProbeWait is how long ProbeWrite waits for SQLite's write lock
// when it is given no wait.
const DefaultProbeWait = time.Second

// ProbeWrite reports whether db can be written now: on a connection of its
// own it runs BEGIN IMMEDIATE, which takes SQLite's write lock, creates a
// table (in the page cache only) and at once rolls back, which releases the
// lock. Nothing reaches the file and nothing is synced, so the lock is held
// for microseconds; while another writer holds it the
// probe waits at most wait (the connection's busy timeout is set to wait for
// the probe and restored after), and reports the database as busy when the
// wait runs out. It fails too when the file is read-only, gone or not a
// database. A full disk is not seen: nothing is written.
func ProbeWrite(ctx context.Context, db *dbsql.DB, wait time.Duration) (err error) {
	if wait <= 0 {
		wait = DefaultProbeWait
	}
	conn, err := db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("database write probe: %w", err)
	}
	defer conn.Close()
	restore, err := setBusyTimeout(ctx, conn, wait)
	if err != nil {
		return fmt.Errorf("database write probe: %w", err)
	}
	// Restore and end what the probe began even when ctx ends meanwhile:
	// the connection goes back to the application's pool.
	bg := context.WithoutCancel(ctx)
	defer func() {
		if _, rerr := conn.ExecContext(bg, restore); rerr != nil {
			discard(conn)
		}
	}()
	start := time.Now()
	if _, err := conn.ExecContext(ctx, `BEGIN IMMEDIATE`); err != nil {
		if IsBusy(err) {
			return fmt.Errorf("database write probe: another writer held the write lock for more than %s: %w", time.Since(start).Round(time.Millisecond), err)
		}
		return fmt.Errorf("database write probe: %w", err)
	}
	// A statement that writes to the file's pages (in the page cache
	// only), so that a read-only file is seen; rolled back at once.
	_, werr := conn.ExecContext(ctx, `CREATE TABLE main.warren_write_probe (x)`)
	if _, err := conn.ExecContext(bg, `ROLLBACK`); err != nil {
		discard(conn)
		return fmt.Errorf("database write probe: rollback: %w", err)
	}
	if werr != nil {
		return fmt.Errorf("database write probe: %w", werr)
	}
	return nil
}

// Write-lock polling for WriteTx: the first retry comes after
// writePollMin, later ones up to writePollMax apart.
const (
	writePollMin = 100 * time.Microsecond
	writePollMax = time.Millisecond
)

// WriteTx runs fn in a write transaction begun with BeginWrite and commits
// it.
func WriteTx(ctx context.Context, db *dbsql.DB, wait time.Duration, fn func(*dbsql.Tx) error) error {
	return writeTx(ctx, db, wait, false, fn)
}

// WriteTxNoSync is WriteTx whose commit does not wait for an fsync
// (synchronous=NORMAL for this transaction; the connection's own setting
// is restored after it): the commit survives a crash of the process but
// not a power loss until the next synced commit or checkpoint of the
// database writes it out. It is for writes whose loss does no harm and
// that should not hold the write lock through an fsync while the
// application waits for it: the relay's marks (a lost mark publishes its
// row again, and the consumers' inboxes drop the copy).
func WriteTxNoSync(ctx context.Context, db *dbsql.DB, wait time.Duration, fn func(*dbsql.Tx) error) error {
	return writeTx(ctx, db, wait, true, fn)
}

func writeTx(ctx context.Context, db *dbsql.DB, wait time.Duration, noSync bool, fn func(*dbsql.Tx) error) error {
	tx, done, err := beginWrite(ctx, db, wait, noSync)
	if err != nil {
		return err
	}
	defer done()
	defer func() { _ = tx.Rollback() }()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

// BeginWrite begins a write transaction (BEGIN IMMEDIATE). While another
// connection holds SQLite's write lock it tries again every 0.1 to 1 ms,
// for at most wait, instead of leaving the wait to SQLite's busy handler:
// that handler sleeps 1, 2, 5, 10 … 100 ms between tries, and against an
// application that commits hundreds of times a second (the lock free for a
// fraction of a millisecond between its transactions) it loses nearly
// every time, for seconds. The connection's busy timeout is 0 while it
// tries and restored once the transaction has begun. Call done after the
// transaction ended (Commit or Rollback): it gives the connection back to
// db's pool.
func BeginWrite(ctx context.Context, db *dbsql.DB, wait time.Duration) (tx *dbsql.Tx, done func(), err error) {
	return beginWrite(ctx, db, wait, false)
}

// beginWrite is BeginWrite; with noSync the transaction commits with
// synchronous=NORMAL and done sets the connection's own level back.
func beginWrite(ctx context.Context, db *dbsql.DB, wait time.Duration, noSync bool) (tx *dbsql.Tx, done func(), err error) {
	conn, err := db.Conn(ctx)
	if err != nil {
		return nil, nil, err
	}
	restore, err := setBusyTimeout(ctx, conn, 0)
	if err != nil {
		_ = conn.Close()
		return nil, nil, err
	}
	// SQLite refuses to change the level inside a transaction: set it
	// before BEGIN, set it back after the commit.
	restoreSync := ""
	if noSync {
		var level int
		if err := conn.QueryRowContext(ctx, `PRAGMA synchronous`).Scan(&level); err == nil {
			if _, err = conn.ExecContext(ctx, `PRAGMA synchronous = NORMAL`); err == nil {
				restoreSync = fmt.Sprintf(`PRAGMA synchronous = %d`, level)
			}
		}
		// On an error the transaction simply commits at the usual level.
	}
	release := func() {
		if restoreSync != "" {
			if _, err := conn.ExecContext(context.WithoutCancel(ctx), restoreSync); err != nil {
				discard(conn)
			}
		}
		_ = conn.Close()
	}
	fail := func(err error) (*dbsql.Tx, func(), error) {
		if _, rerr := conn.ExecContext(context.WithoutCancel(ctx), restore); rerr != nil {
			discard(conn)
		}
		release()
		return nil, nil, err
	}
	if tx, err = beginPolling(ctx, conn, wait); err != nil {
		return fail(err)
	}
	// The busy timeout is the connection's, not the transaction's: set it
	// back now, so that the transaction's statements and whoever takes the
	// connection next wait as usual.
	if _, err := tx.ExecContext(ctx, restore); err != nil {
		_ = tx.Rollback()
		discard(conn)
		release()
		return nil, nil, err
	}
	return tx, release, nil
}

// beginPolling begins a write transaction on conn, whose busy timeout is
// 0, trying again while another connection holds the write lock, for at
// most wait.
func beginPolling(ctx context.Context, conn *dbsql.Conn, wait time.Duration) (*dbsql.Tx, error) {
	start := time.Now()
	delay := writePollMin
	for {
		tx, err := conn.BeginTx(ctx, nil)
		if err == nil {
			return tx, nil
		}
		if !IsBusy(err) {
			return nil, err
		}
		if time.Since(start) >= wait {
			return nil, fmt.Errorf("another writer held the write lock for more than %s: %w", wait, err)
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, context.Cause(ctx)
		}
		delay = min(delay*2, writePollMax)
	}
}

// Writer is a connection taken from a pool for one writer's transactions,
// one after the other (the consumer's committer). It begins them as
// BeginWrite does, but sets the connection's busy timeout to 0 once, when
// it is taken, and back when it is closed, instead of around every
// transaction: three statements fewer per transaction. The transaction's
// own statements run with the busy timeout 0; holding SQLite's write lock
// (BEGIN IMMEDIATE) in WAL mode, they have nothing to wait for. Close it
// whenever its writer goes idle: the pool may be the application's, with
// one connection. A Writer is not safe for concurrent use.
type Writer struct {
	db      *dbsql.DB
	conn    *dbsql.Conn
	restore string
}

// NewWriter returns a Writer on db; it takes a connection at the first
// Begin.
func NewWriter(db *dbsql.DB) *Writer { return &Writer{db: db} }

// Begin begins a write transaction (BEGIN IMMEDIATE), trying again while
// another connection holds the write lock, for at most wait. The
// transaction must end (Commit or Rollback) before the next Begin.
func (w *Writer) Begin(ctx context.Context, wait time.Duration) (*dbsql.Tx, error) {
	if w.conn == nil {
		conn, err := w.db.Conn(ctx)
		if err != nil {
			return nil, err
		}
		restore, err := setBusyTimeout(ctx, conn, 0)
		if err != nil {
			_ = conn.Close()
			return nil, err
		}
		w.conn, w.restore = conn, restore
	}
	tx, err := beginPolling(ctx, w.conn, wait)
	if err != nil && !IsBusy(err) && ctx.Err() == nil {
		// Not the lock: the connection may be broken; take another next
		// time.
		w.Close()
	}
	return tx, err
}

// Close sets the connection's busy timeout back and gives it back to the
// pool; a Begin after it takes a connection again.
func (w *Writer) Close() {
	if w.conn == nil {
		return
	}
	if _, err := w.conn.ExecContext(context.Background(), w.restore); err != nil {
		discard(w.conn)
	}
	_ = w.conn.Close()
	w.conn = nil
}

// setBusyTimeout sets conn's busy timeout to d and returns the statement
// that sets back the one it had: the connection goes back to a pool that
// may be the application's.
func setBusyTimeout(ctx context.Context, conn *dbsql.Conn, d time.Duration) (restore string, err error) {
	var old int64
	if err := conn.QueryRowContext(ctx, `PRAGMA busy_timeout`).Scan(&old); err != nil {
		return "", err
	}
	if _, err := conn.ExecContext(ctx, fmt.Sprintf(`PRAGMA busy_timeout = %d`, d.Milliseconds())); err != nil {
		return "", err
	}
	return fmt.Sprintf(`PRAGMA busy_timeout = %d`, old), nil
}

// discard makes the pool drop conn instead of reusing it.
func discard(conn *dbsql.Conn) {
	_ = conn.Raw(func(any) error { return driver.ErrBadConn })
}

// Pruning pace: each batch is one short write transaction; a batch that
// took longer than pruneSlow halves the next, one faster than pruneFast
// doubles it (up to the batch size asked for). Between batches the pruner
// rests at least as long as the batch took, so other writers always get
// the lock in between.
const (
	pruneSlow    = 40 * time.Millisecond
	pruneFast    = 10 * time.Millisecond
	pruneMinRest = 5 * time.Millisecond
	pruneMinSize = 10
)

// PruneBatches calls step with a row limit until step deletes fewer rows
// than its limit, and returns the rows deleted in all. step must delete at
// most limit rows in one short transaction (a single DELETE … LIMIT
// statement is one). The limit starts at batch (at most) and adapts so that
// a step holds SQLite's write lock for about 10 to 40 ms; between steps the
// pruner rests at least as long as the step took, so that the
// application's writers, which wait on the busy timeout, get the lock in
// between and are delayed by one short step at most. A busy error (the
// lock was not free within the busy timeout) halves the limit and tries
// again after a rest.
func PruneBatches(ctx context.Context, batch int, step func(ctx context.Context, limit int) (int64, error)) (int64, error) {
	if batch <= 0 {
		batch = 1000
	}
	limit := min(batch, 100)
	var total int64
	for {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		start := time.Now()
		n, err := step(ctx, limit)
		took := time.Since(start)
		if err != nil {
			if !IsBusy(err) {
				return total, err
			}
			limit = max(limit/2, pruneMinSize)
			n = int64(limit) // not done: try again
		} else {
			total += n
			if n < int64(limit) {
				return total, nil
			}
			switch {
			case took > pruneSlow:
				limit = max(limit/2, pruneMinSize)
			case took < pruneFast:
				limit = min(limit*2, batch)
			}
		}
		rest := max(took, pruneMinRest)
		t := time.NewTimer(rest)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return total, ctx.Err()
		}
	}
}
