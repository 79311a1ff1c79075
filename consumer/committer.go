package consumer

import (
	"context"
	dbsql "database/sql"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"time"

	"github.com/warrenmq/warren/inbox"
)

// abandonGrace is how long past its deadline a handler may take to return
// before the committer gives up on it.
const abandonGrace = 2 * time.Second

type jobKind int

const (
	// jobHandle claims the delivery in the inbox and runs the handler.
	jobHandle jobKind = iota
	// jobRecord runs a recording function (a failure, a poisoning, a
	// duplicate) and nothing else.
	jobRecord
)

type outcome int

const (
	outcomeOK outcome = iota
	outcomeDuplicate
	outcomeFailed
)

// job is one unit of work for the committer, run under a savepoint of its
// own in a shared transaction.
type job struct {
	kind jobKind
	d    *Delivery
	// failStatus is the status a failed handler run is recorded with.
	failStatus inbox.Status
	record     func(ctx context.Context, e inbox.Execer) error
	done       chan jobResult
}

type jobResult struct {
	outcome outcome
	// err is the handler's error (outcomeFailed) or a database error.
	err error
	// recorded: the failure row was written in the committed transaction.
	recorded bool
	// took is how long the handler ran.
	took time.Duration
}

// committer runs jobs in batches: one BEGIN IMMEDIATE transaction, a
// savepoint per job (a failing job is rolled back to its savepoint and
// does not undo the others), one COMMIT, then every job's result is
// released. SQLite has one writer and warren commits with
// synchronous=FULL, so one fsync per batch instead of one per delivery is
// where the throughput comes from.
type committer struct {
	db       *dbsql.DB
	handler  Handler
	timeout  time.Duration
	maxBatch int
	log      *slog.Logger
	// base is the parent of every handler context: it outlives a clean
	// stop (in-flight handlers finish) and is cancelled on abort.
	base context.Context

	jobs  chan *job
	stmts stmtCache
	done  chan struct{}
}

func newCommitter(base context.Context, db *dbsql.DB, h Handler, timeout time.Duration, maxBatch int, log *slog.Logger) *committer {
	return &committer{
		db: db, handler: h, timeout: timeout, maxBatch: maxBatch, log: log, base: base,
		jobs:  make(chan *job, maxBatch),
		stmts: stmtCache{db: db, m: map[string]*dbsql.Stmt{}},
		done:  make(chan struct{}),
	}
}

// submit queues j and waits for its result.
func (c *committer) submit(j *job) jobResult {
	j.done = make(chan jobResult, 1)
	c.jobs <- j
	return <-j.done
}

// close stops the loop once the queued jobs ran; no submit may follow.
func (c *committer) close() {
	close(c.jobs)
	<-c.done
	c.stmts.close()
}

func (c *committer) loop() {
	defer close(c.done)
	batch := make([]*job, 0, c.maxBatch)
	for {
		j, ok := <-c.jobs
		if !ok {
			return
		}
		batch = append(batch[:0], j)
	gather:
		for len(batch) < c.maxBatch {
			select {
			case j, ok := <-c.jobs:
				if !ok {
					break gather
				}
				batch = append(batch, j)
			default:
				break gather
			}
		}
		for len(batch) > 0 {
			batch = c.run(batch)
		}
	}
}

const (
	savepoint  = `SAVEPOINT warren_job`
	rollbackTo = `ROLLBACK TO warren_job`
	release    = `RELEASE warren_job`
)

// run runs one batch and returns the jobs to run again in a new
// transaction (when a handler had to be abandoned).
func (c *committer) run(batch []*job) []*job {
	ctx := context.WithoutCancel(c.base)
	tx, err := c.db.BeginTx(ctx, nil)
	if err != nil {
		c.failAll(batch, fmt.Errorf("inbox: begin: %w", err))
		return nil
	}
	x := txExec{tx: tx, cache: &c.stmts}
	results := make([]jobResult, len(batch))
	for i, j := range batch {
		if _, err := x.ExecContext(ctx, savepoint); err != nil {
			_ = tx.Rollback()
			c.failAll(batch, fmt.Errorf("inbox: savepoint: %w", err))
			return nil
		}
		res, keep, abandoned := c.runJob(ctx, tx, x, j)
		if abandoned {
			// The handler still runs and may use tx: end it, so it
			// cannot, and run the others again in a new transaction.
			_ = tx.Rollback()
			j.done <- res
			return append(batch[:i:i], batch[i+1:]...)
		}
		if !keep {
			_, err = x.ExecContext(ctx, rollbackTo)
		}
		if err == nil {
			_, err = x.ExecContext(ctx, release)
		}
		if err != nil {
			_ = tx.Rollback()
			c.failAll(batch, fmt.Errorf("inbox: end savepoint (did the handler end the transaction?): %w", err))
			return nil
		}
		if res.outcome == outcomeFailed && j.kind == jobHandle && !keep {
			// Record the failure in the same transaction, after the
			// handler's writes were rolled back.
			if err := inbox.RecordFailure(ctx, x, &j.d.Delivery, j.d.Attempt, res.err, j.failStatus); err != nil {
				c.log.Error("inbox: cannot record a failed attempt", "message_id", j.d.MessageID, "error", err)
			} else {
				res.recorded = true
			}
		}
		results[i] = res
	}
	if err := tx.Commit(); err != nil {
		c.failAll(batch, fmt.Errorf("inbox: commit: %w", err))
		return nil
	}
	for i, j := range batch {
		j.done <- results[i]
	}
	return nil
}

// runJob runs j under the savepoint. keep says whether its writes stay
// (release) or go (rollback to the savepoint).
func (c *committer) runJob(ctx context.Context, tx *dbsql.Tx, x inbox.Execer, j *job) (res jobResult, keep, abandoned bool) {
	switch j.kind {
	case jobRecord:
		if err := j.record(ctx, x); err != nil {
			return jobResult{outcome: outcomeFailed, err: err}, false, false
		}
		return jobResult{outcome: outcomeOK}, true, false
	}
	fresh, err := inbox.MarkProcessed(ctx, x, &j.d.Delivery, j.d.Attempt)
	if err != nil {
		return jobResult{outcome: outcomeFailed, err: err}, false, false
	}
	if !fresh {
		if err := inbox.RecordDuplicate(ctx, x, j.d.Consumer, j.d.MessageID); err != nil {
			c.log.Warn("inbox: cannot count a duplicate", "message_id", j.d.MessageID, "error", err)
		}
		return jobResult{outcome: outcomeDuplicate}, true, false
	}
	start := time.Now()
	err, abandoned = c.callHandler(tx, j.d)
	res = jobResult{outcome: outcomeOK, err: err, took: time.Since(start)}
	if err != nil {
		res.outcome = outcomeFailed
	}
	return res, err == nil, abandoned
}

// callHandler runs the handler with the handler timeout, turning a panic
// into an error. A handler that does not return within the timeout plus
// abandonGrace is abandoned (it keeps running in its goroutine).
func (c *committer) callHandler(tx *dbsql.Tx, d *Delivery) (err error, abandoned bool) {
	ctx, cancel := context.WithTimeout(c.base, c.timeout)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				c.log.Error("handler panicked", "message_id", d.MessageID, "panic", r, "stack", string(debug.Stack()))
				done <- fmt.Errorf("handler panicked: %v", r)
			}
		}()
		done <- c.handler.Handle(ctx, tx, d)
	}()
	timer := time.NewTimer(c.timeout + abandonGrace)
	defer timer.Stop()
	select {
	case err := <-done:
		if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = fmt.Errorf("handler timeout %s: %w", c.timeout, err)
		}
		return err, false
	case <-timer.C:
		c.log.Error("handler ignored its deadline; abandoning it and running the rest of its batch again",
			"message_id", d.MessageID, "handler_timeout", c.timeout)
		return fmt.Errorf("handler did not return within the handler timeout %s (it ignores its context)", c.timeout), true
	}
}

func (c *committer) failAll(batch []*job, err error) {
	c.log.Error("inbox transaction failed", "deliveries", len(batch), "error", err)
	for _, j := range batch {
		j.done <- jobResult{outcome: outcomeFailed, err: err}
	}
}

// stmtCache keeps the inbox's statements prepared on the database, so that
// each transaction reuses them on its connection instead of preparing
// them for every delivery.
type stmtCache struct {
	db *dbsql.DB
	mu sync.Mutex
	m  map[string]*dbsql.Stmt
}

func (s *stmtCache) get(ctx context.Context, query string) (*dbsql.Stmt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.m[query]; ok {
		return st, nil
	}
	st, err := s.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	s.m[query] = st
	return st, nil
}

func (s *stmtCache) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for q, st := range s.m {
		_ = st.Close()
		delete(s.m, q)
	}
}

// txExec is an inbox.Execer on a transaction that uses the cached
// statements.
type txExec struct {
	tx    *dbsql.Tx
	cache *stmtCache
}

func (x txExec) ExecContext(ctx context.Context, query string, args ...any) (dbsql.Result, error) {
	st, err := x.cache.get(ctx, query)
	if err != nil {
		return x.tx.ExecContext(ctx, query, args...)
	}
	return x.tx.StmtContext(ctx, st).ExecContext(ctx, args...)
}
