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
	// row is the delivery's processed row (jobHandle), encoded before the
	// job was queued.
	row    *inbox.ProcessedRow
	record func(ctx context.Context, e inbox.Execer) error
	done   chan jobResult
}

type jobResult struct {
	outcome outcome
	// err is the handler's error (outcomeFailed) or a database error.
	err error
	// recorded: the failure row was written in the committed transaction.
	recorded bool
	// took is how long the handler ran.
	took time.Duration
	// abandoned: the handler ignored its deadline and may still run,
	// reading its Delivery.
	abandoned bool
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

	jobs chan *job
	// writer holds the connection the batches run on, one at a time. The
	// inbox statements run on the batch's transaction and are prepared
	// once per connection by the driver's statement cache (sql.DSN's
	// _stmt_cache_size), not by database/sql, whose prepare on the
	// database takes a connection of the pool: an application that gives
	// its database one connection would wait forever for the one the
	// batch holds.
	writer *wsql.Writer
	done   chan struct{}
	// commitTime is a moving average of the commit time (nanoseconds).
	commitTime atomic.Int64
}

func newCommitter(base context.Context, db *dbsql.DB, h Handler, timeout time.Duration, maxBatch int, log *slog.Logger) *committer {
	return &committer{
		db: db, handler: h, timeout: timeout, maxBatch: maxBatch, log: log, base: base,
		jobs:   make(chan *job, maxBatch),
		writer: wsql.NewWriter(db),
		done:   make(chan struct{}),
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
	c.writer.Close()
}

func (c *committer) loop() { c.loopFrom(nil) }

// loopFrom runs the jobs of pending in a transaction of their own, then
// batches and runs the queued jobs until the queue is closed. It returns
// early, leaving the work to another loopFrom, when the watchdog abandoned
// a handler of its batch.
func (c *committer) loopFrom(pending []*job) {
	for len(pending) > 0 {
		var alive bool
		if pending, alive = c.run(pending); !alive {
			return
		}
	}
	batch := make([]*job, 0, c.maxBatch)
	var (
		released int       // jobs the last batch released
		lastEnd  time.Time // when it ended
	)
	for {
		var j *job
		var ok bool
		select {
		case j, ok = <-c.jobs:
		default:
			// Idle: the Writer's connection goes back to the pool, which
			// may be the application's and hold one connection, until
			// the next delivery. Under load the queue is never empty and
			// the connection stays.
			c.writer.Close()
			j, ok = <-c.jobs
		}
		if !ok {
			close(c.done)
			return
		}
		batch = append(batch[:0], j)
		open := c.drain(&batch)
		// Group commit: when the consumer runs at its limit, the
		// deliveries the last batch released are on their way back (ack,
		// next delivery, parse). When this batch would be short of them,
		// wait a moment for them rather than pay a commit for a part of
		// them. Never after a pause, and never after a small batch: then
		// deliveries arrive at the producers' pace, not in a loop with
		// the commits, and waiting would only delay them.
		if wait := c.groupWait(); open && released >= c.maxBatch/4 && time.Since(lastEnd) < wait {
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
			var alive bool
			if batch, alive = c.run(batch); !alive {
				return
			}
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

// run runs one batch in one transaction. alive is false when the
// watchdog abandoned a handler of the batch: it rolled the transaction
// back and handed the other jobs to a new committer goroutine, and this
// one must stop (its handler has returned at last).
func (c *committer) run(batch []*job) (rest []*job, alive bool) {
	ctx := context.WithoutCancel(c.base)
	// The inbox often lives in the application's database: wait for the
	// write lock in a way that a busy application cannot starve.
	tx, err := c.writer.Begin(ctx, wsql.DefaultBusyTimeout)
	if err != nil {
		c.failAll(batch, fmt.Errorf("inbox: begin: %w", err))
		return nil, true
	}
	w := &watchdog{c: c, batch: batch, tx: tx, job: -1}
	defer w.close()
	results := make([]jobResult, len(batch))
	for i, j := range batch {
		res, err := c.runJob(ctx, tx, j, w, i)
		if errors.Is(err, errAbandoned) {
			return nil, false
		}
		if err != nil {
			_ = tx.Rollback()
			c.failAll(batch, err)
			return nil, true
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
		return nil, true
	}
	// The deliveries whose handler succeeded (or that were processed
	// before) are acked now, all at once, rather than each when its
	// handler goroutine has unwound to the Router: the broker sends the
	// next ones meanwhile.
	for i, j := range batch {
		if r := results[i]; j.kind == jobHandle && j.d.msg != nil &&
			(r.outcome == outcomeOK && r.err == nil || r.outcome == outcomeDuplicate) {
			settleEarly(j.d.msg)
		}
	}
	for i, j := range batch {
		j.done <- results[i]
	}
	return nil, true
}

// errAbandoned: the watchdog gave up on the handler that just returned.
var errAbandoned = errors.New("handler abandoned")

// watchdog gives up on a handler that runs past its deadline plus
// abandonGrace (it ignores its context). Handlers run on the committer's
// goroutine, so the watchdog does the rest of the batch's work: it rolls
// the transaction back (so the handler cannot write any more), fails the
// delivery, and hands the batch's other jobs to a new committer goroutine.
// The abandoned goroutine exits when the handler returns.
type watchdog struct {
	c     *committer
	batch []*job
	tx    *dbsql.Tx
	timer *time.Timer

	mu        sync.Mutex
	job       int // index of the job whose handler runs; -1 when none
	deadline  time.Time
	abandoned bool
}

// start watches the handler of job i.
func (w *watchdog) start(i int) {
	limit := w.c.timeout + abandonGrace
	w.mu.Lock()
	w.job, w.deadline = i, time.Now().Add(limit)
	w.mu.Unlock()
	if w.timer == nil {
		w.timer = time.AfterFunc(limit, w.fire)
	} else {
		w.timer.Reset(limit)
	}
}

// stop ends the watch; it reports false when the handler was abandoned.
func (w *watchdog) stop() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.job = -1
	return !w.abandoned
}

func (w *watchdog) close() {
	if w.timer != nil {
		w.timer.Stop()
	}
}

func (w *watchdog) fire() {
	w.mu.Lock()
	if w.job < 0 || w.abandoned {
		w.mu.Unlock()
		return
	}
	if left := time.Until(w.deadline); left > 0 {
		// A fire meant for an earlier handler of the batch.
		w.timer.Reset(left)
		w.mu.Unlock()
		return
	}
	w.abandoned = true
	i := w.job
	w.mu.Unlock()
	c, j := w.c, w.batch[i]
	c.log.Error("handler ignored its deadline; abandoning it and running the rest of its batch again",
		"message_id", j.d.MessageID, "handler_timeout", c.timeout)
	_ = w.tx.Rollback() // the committer's connection is free again
	j.done <- jobResult{outcome: outcomeFailed, took: c.timeout + abandonGrace, abandoned: true,
		err: fmt.Errorf("handler did not return within the handler timeout %s (it ignores its context)", c.timeout)}
	rest := make([]*job, 0, len(w.batch)-1)
	rest = append(rest, w.batch[:i]...)
	rest = append(rest, w.batch[i+1:]...)
	go c.loopFrom(rest)
}

// runJob runs j in tx. A job that runs the application's handler runs
// under a savepoint: a failure rolls back to it, undoing the handler's
// writes and the inbox claim, and the failure is recorded instead. The
// other jobs are single statements, atomic by themselves. err is a
// failure of the transaction itself (the batch is lost), or errAbandoned.
func (c *committer) runJob(ctx context.Context, tx *dbsql.Tx, j *job, w *watchdog, i int) (res jobResult, err error) {
	if j.kind == jobRecord {
		if err := j.record(ctx, tx); err != nil {
			return jobResult{outcome: outcomeFailed, err: err}, nil
		}
		return jobResult{outcome: outcomeOK}, nil
	}
	_, builtin := c.handler.(builtinHandler)
	if !builtin {
		if _, err := tx.ExecContext(ctx, savepoint); err != nil {
			return jobResult{}, fmt.Errorf("inbox: savepoint: %w", err)
		}
	}
	res, err = c.handle(ctx, tx, j, builtin, w, i)
	if err != nil || builtin {
		return res, err
	}
	if res.outcome == outcomeFailed {
		_, err = tx.ExecContext(ctx, rollbackTo)
	}
	if err == nil {
		_, err = tx.ExecContext(ctx, release)
	}
	if err != nil {
		return jobResult{}, fmt.Errorf("inbox: end savepoint (did the handler end the transaction?): %w", err)
	}
	if res.outcome == outcomeFailed {
		// Record the failure in the same transaction, after the handler's
		// writes were rolled back.
		if err := inbox.RecordFailure(ctx, tx, &j.d.Delivery, j.d.Attempt, res.err, j.failStatus); err != nil {
			c.log.Error("inbox: cannot record a failed attempt", "message_id", j.d.MessageID, "error", err)
		} else {
			res.recorded = true
		}
	}
	return res, nil
}

// handle claims the delivery and runs the handler; err is errAbandoned
// or nil.
func (c *committer) handle(ctx context.Context, tx *dbsql.Tx, j *job, builtin bool, w *watchdog, i int) (jobResult, error) {
	fresh, err := inbox.MarkProcessedRow(ctx, tx, j.row)
	if err != nil {
		return jobResult{outcome: outcomeFailed, err: err}, nil
	}
	if !fresh {
		if err := inbox.RecordDuplicate(ctx, tx, j.d.Consumer, j.d.MessageID); err != nil {
			c.log.Warn("inbox: cannot count a duplicate", "message_id", j.d.MessageID, "error", err)
		}
		return jobResult{outcome: outcomeDuplicate}, nil
	}
	if builtin {
		return jobResult{outcome: outcomeOK}, nil // its Handle does nothing
	}
	start := time.Now()
	w.start(i)
	err = c.callHandler(tx, j.d)
	if !w.stop() {
		return jobResult{}, errAbandoned
	}
	res := jobResult{outcome: outcomeOK, err: err, took: time.Since(start)}
	if err != nil {
		res.outcome = outcomeFailed
	}
	return res, nil
}

// callHandler runs the handler on the committer's goroutine, with the
// handler timeout as its context's deadline, turning a panic into an
// error. (The watchdog deals with a handler that ignores its deadline.)
func (c *committer) callHandler(tx *dbsql.Tx, d *Delivery) (err error) {
	ctx, cancel := context.WithTimeout(c.base, c.timeout)
	defer cancel()
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("handler panicked", "message_id", d.MessageID, "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("handler panicked: %v", r)
		}
	}()
	err = c.handler.Handle(ctx, tx, d)
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		err = fmt.Errorf("handler timeout %s: %w", c.timeout, err)
	}
	return err
}

func (c *committer) failAll(batch []*job, err error) {
	c.log.Error("inbox transaction failed", "deliveries", len(batch), "error", err)
	for _, j := range batch {
		j.done <- jobResult{outcome: outcomeFailed, err: err}
	}
}
