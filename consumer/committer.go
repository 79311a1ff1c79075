package consumer

import (
	"context"
	dbsql "database/sql"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warrenmq/warren/inbox"
	wsql "github.com/warrenmq/warren/sql"
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

// job is one unit of work for the committer, run in the transaction it
// shares with the rest of its batch.
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
// savepoint per run of the application's handler (a failing one is rolled
// back to its savepoint and does not undo the others), one COMMIT, then
// every job's result is released. SQLite has one writer and warren commits with
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
	// commitTime is a moving average of the commit time (nanoseconds).
	commitTime atomic.Int64
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
	var (
		released int       // jobs the last batch released
		lastEnd  time.Time // when it ended
	)
	for {
		j, ok := <-c.jobs
		if !ok {
			return
		}
		batch = append(batch[:0], j)
		open := c.drain(&batch)
		// Group commit: the deliveries the last batch released are on
		// their way back (ack, next delivery, parse). When this batch
		// would be short of them, wait a moment for them rather than pay
		// a commit for a part of them. Never after a pause: then the
		// first delivery goes at once.
		if wait := c.groupWait(); open && time.Since(lastEnd) < wait {
			want := min(c.maxBatch, len(batch)+released)
			deadline := time.NewTimer(wait)
		gather:
			for len(batch) < want {
				select {
				case j, ok := <-c.jobs:
					if !ok {
						break gather
					}
					batch = append(batch, j)
					if !c.drain(&batch) {
						break gather
					}
				case <-deadline.C:
					break gather
				}
			}
			deadline.Stop()
		}
		released = len(batch)
		for len(batch) > 0 {
			batch = c.run(batch)
		}
		lastEnd = time.Now()
	}
}

// drain appends the jobs that are ready, up to maxBatch. It returns false
// when the jobs channel is closed.
func (c *committer) drain(batch *[]*job) bool {
	for len(*batch) < c.maxBatch {
		select {
		case j, ok := <-c.jobs:
			if !ok {
				return false
			}
			*batch = append(*batch, j)
		default:
			return true
		}
	}
	return true
}

// groupWait is how long the committer waits for the deliveries its last
// batch released: as long as a commit takes lately (waiting that long
// costs no more than the commit it saves), within bounds.
func (c *committer) groupWait() time.Duration {
	return min(max(time.Duration(c.commitTime.Load()), minGroupWait), maxGroupWait)
}

// Bounds of the group commit wait.
const (
	minGroupWait = 100 * time.Microsecond
	maxGroupWait = 5 * time.Millisecond
)

const (
	savepoint  = `SAVEPOINT warren_job`
	rollbackTo = `ROLLBACK TO warren_job`
	release    = `RELEASE warren_job`
)

// run runs one batch and returns the jobs to run again in a new
// transaction (when a handler had to be abandoned).
func (c *committer) run(batch []*job) []*job {
	ctx := context.WithoutCancel(c.base)
	// The inbox often lives in the application's database: wait for the
	// write lock in a way that a busy application cannot starve.
	tx, done, err := wsql.BeginWrite(ctx, c.db, wsql.DefaultBusyTimeout)
	if err != nil {
		c.failAll(batch, fmt.Errorf("inbox: begin: %w", err))
		return nil
	}
	defer done()
	x := &txExec{tx: tx, cache: &c.stmts}
	results := make([]jobResult, len(batch))
	for i, j := range batch {
		res, abandoned, err := c.runJob(ctx, tx, x, j)
		if abandoned {
			// The handler still runs and may use tx: end it, so it
			// cannot, and run the others again in a new transaction.
			_ = tx.Rollback()
			j.done <- res
			return append(batch[:i:i], batch[i+1:]...)
		}
		if err != nil {
			_ = tx.Rollback()
			c.failAll(batch, err)
			return nil
		}
		results[i] = res
	}
	tc := time.Now()
	err = tx.Commit()
	took := time.Since(tc)
	// A moving average of the commit time, for the group commit wait.
	c.commitTime.Store((3*c.commitTime.Load() + int64(took)) / 4)
	if err != nil {
		c.failAll(batch, fmt.Errorf("inbox: commit: %w", err))
		return nil
	}
	for i, j := range batch {
		j.done <- results[i]
	}
	return nil
}

// runJob runs j in tx. A job that runs the application's handler runs
// under a savepoint: a failure rolls back to it, undoing the handler's
// writes and the inbox claim, and the failure is recorded instead. The
// other jobs are single statements, atomic by themselves. err is a
// failure of the transaction itself: the batch is lost.
func (c *committer) runJob(ctx context.Context, tx *dbsql.Tx, x *txExec, j *job) (res jobResult, abandoned bool, err error) {
	if j.kind == jobRecord {
		if err := j.record(ctx, x); err != nil {
			return jobResult{outcome: outcomeFailed, err: err}, false, nil
		}
		return jobResult{outcome: outcomeOK}, false, nil
	}
	_, builtin := c.handler.(builtinHandler)
	if !builtin {
		if _, err := x.ExecContext(ctx, savepoint); err != nil {
			return jobResult{}, false, fmt.Errorf("inbox: savepoint: %w", err)
		}
	}
	res, abandoned = c.handle(ctx, tx, x, j, builtin)
	if abandoned || builtin {
		return res, abandoned, nil
	}
	if res.outcome == outcomeFailed {
		_, err = x.ExecContext(ctx, rollbackTo)
	}
	if err == nil {
		_, err = x.ExecContext(ctx, release)
	}
	if err != nil {
		return jobResult{}, false, fmt.Errorf("inbox: end savepoint (did the handler end the transaction?): %w", err)
	}
	if res.outcome == outcomeFailed {
		// Record the failure in the same transaction, after the handler's
		// writes were rolled back.
		if err := inbox.RecordFailure(ctx, x, &j.d.Delivery, j.d.Attempt, res.err, j.failStatus); err != nil {
			c.log.Error("inbox: cannot record a failed attempt", "message_id", j.d.MessageID, "error", err)
		} else {
			res.recorded = true
		}
	}
	return res, false, nil
}

// handle claims the delivery and runs the handler.
func (c *committer) handle(ctx context.Context, tx *dbsql.Tx, x *txExec, j *job, builtin bool) (jobResult, bool) {
	fresh, err := inbox.MarkProcessed(ctx, x, &j.d.Delivery, j.d.Attempt)
	if err != nil {
		return jobResult{outcome: outcomeFailed, err: err}, false
	}
	if !fresh {
		if err := inbox.RecordDuplicate(ctx, x, j.d.Consumer, j.d.MessageID); err != nil {
			c.log.Warn("inbox: cannot count a duplicate", "message_id", j.d.MessageID, "error", err)
		}
		return jobResult{outcome: outcomeDuplicate}, false
	}
	if builtin {
		return jobResult{outcome: outcomeOK}, false // its Handle does nothing
	}
	start := time.Now()
	err, abandoned := c.callHandler(tx, j.d)
	res := jobResult{outcome: outcomeOK, err: err, took: time.Since(start)}
	if err != nil {
		res.outcome = outcomeFailed
	}
	return res, abandoned
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
// statements, bound to the transaction once per query.
type txExec struct {
	tx    *dbsql.Tx
	cache *stmtCache
	bound map[string]*dbsql.Stmt
}

func (x *txExec) ExecContext(ctx context.Context, query string, args ...any) (dbsql.Result, error) {
	st, ok := x.bound[query]
	if !ok {
		prepared, err := x.cache.get(ctx, query)
		if err != nil {
			return x.tx.ExecContext(ctx, query, args...)
		}
		st = x.tx.StmtContext(ctx, prepared)
		if x.bound == nil {
			x.bound = map[string]*dbsql.Stmt{}
		}
		x.bound[query] = st
	}
	return st.ExecContext(ctx, args...)
}
