package relay

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/gofrs/flock"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

// Relay publishes a database's outbox to RabbitMQ. Create it with New and
// call Run.
type Relay struct {
	cfg Config

	mu      sync.Mutex
	running bool
	abort   context.CancelFunc
	marked  int64
}

// New checks cfg and returns a Relay. It does not touch the database or the
// broker; Run does.
func New(cfg Config) (*Relay, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Relay{cfg: cfg}, nil
}

// ErrAlreadyRunning is returned by Run on a Relay that is running.
var ErrAlreadyRunning = errors.New("relay is already running")

// Run publishes until ctx is done, then drains: it stops reading, waits for
// the outstanding confirms (at most DrainTimeout), marks them published and
// returns nil. While another relay holds the database's lock, Run waits as
// a standby and takes over when that relay's process ends.
func (r *Relay) Run(ctx context.Context) error {
	r.mu.Lock()
	if r.running {
		r.mu.Unlock()
		return ErrAlreadyRunning
	}
	r.running = true
	msgCtx, abort := context.WithCancel(context.WithoutCancel(ctx))
	r.abort = abort
	r.mu.Unlock()
	defer func() {
		abort()
		r.mu.Lock()
		r.running = false
		r.mu.Unlock()
	}()

	log := r.cfg.Logger
	if err := wsql.Check(ctx, r.cfg.DB); err != nil {
		return fmt.Errorf("relay: %w", err)
	}

	lock := flock.New(r.cfg.LockFile, flock.SetPermissions(0o600))
	locked, err := lock.TryLock()
	if err != nil {
		return fmt.Errorf("relay: lock %s: %w", r.cfg.LockFile, err)
	}
	if !locked {
		log.Info("standby: another relay publishes from this database; waiting to take over", "lock", r.cfg.LockFile)
		locked, err = lock.TryLockContext(ctx, DefaultLockRetry)
		if err != nil || !locked {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("relay: lock %s: %w", r.cfg.LockFile, err)
		}
		log.Info("took over: this relay now publishes from the database", "lock", r.cfg.LockFile)
	}
	defer func() { _ = lock.Unlock() }()

	pruneCtx, stopPrune := context.WithCancel(ctx)
	var pruning sync.WaitGroup
	pruning.Go(func() { r.prune(pruneCtx, log) })
	defer pruning.Wait()
	defer stopPrune()

	watcher, err := outbox.Watch(r.cfg.DBPath, r.cfg.PollFallback, log)
	if err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	defer func() { _ = watcher.Close() }()

	mk := newMarker(msgCtx, r.cfg.DB, log, func(n int) {
		r.mu.Lock()
		r.marked += int64(n)
		r.mu.Unlock()
	})
	go mk.run()

	sub := &subscriber{cfg: r.cfg, db: r.cfg.DB, wake: watcher.C, marks: mk, msgCtx: msgCtx, log: log,
		stopped: make(chan struct{}), results: make(chan result, r.cfg.Window)}

	router, err := message.NewRouter(message.RouterConfig{CloseTimeout: r.cfg.DrainTimeout},
		newQuietLogger(log, 5*time.Second))
	if err != nil {
		mk.close()
		<-mk.done
		return fmt.Errorf("relay: router: %w", err)
	}
	if r.cfg.Metrics != nil {
		r.cfg.Metrics.router.instrument(router)
	}
	publish := publishRows(r.cfg.Publisher)
	router.AddConsumerHandler("warren-relay", "warren_outbox", sub, func(msg *message.Message) error {
		b := batchOf(msg)
		if b == nil {
			return fmt.Errorf("relay: message %s carries no outbox rows", msg.UUID)
		}
		errs := publish(msgCtx, b.exchange, b.rows)
		sub.report(msg, errs) // the router acks or nacks msg as it returns
		return batchError(errs)
	})

	log.Info("relay started", "db", r.cfg.DBPath, "window", r.cfg.Window)
	runErr := router.Run(ctx)

	// Give outstanding publishes DrainTimeout to confirm; then abort them.
	select {
	case <-sub.stopped:
	case <-time.After(r.cfg.DrainTimeout):
		log.Warn("relay stop: outstanding confirms did not arrive in time; aborting them (they will be published again)", "timeout", r.cfg.DrainTimeout)
		abort()
		<-sub.stopped
	}
	mk.close()
	<-mk.done
	r.mu.Lock()
	marked := r.marked
	r.mu.Unlock()
	log.Info("relay stopped", "marked_published", marked)
	if runErr != nil {
		return fmt.Errorf("relay: router: %w", runErr)
	}
	return nil
}

// batchError is what the handler returns to the Router for a batch: nil
// when every row was published, else one line that counts the failed rows
// and gives the first error (the Router logs it; each row is retried on
// its own).
func batchError(errs []error) error {
	var first error
	failed := 0
	for _, err := range errs {
		if err != nil {
			if first == nil {
				first = err
			}
			failed++
		}
	}
	switch {
	case failed == 0:
		return nil
	case len(errs) == 1:
		return first
	}
	return fmt.Errorf("%d of %d rows not published, they will be retried; the first: %w", failed, len(errs), first)
}

// eachPublisher is a publisher that reports the outcome of every message
// of a call, as *publisher.Publisher does.
type eachPublisher interface {
	PublishEach(topic string, msgs ...*message.Message) []error
}

// preparedPublisher publishes AMQP publishings without Watermill messages,
// reporting each one's outcome, as *publisher.Publisher does.
type preparedPublisher interface {
	PublishPrepared(ctx context.Context, exchange string, pubs []publisher.Prepared) []error
}

var (
	_ eachPublisher     = (*publisher.Publisher)(nil)
	_ preparedPublisher = (*publisher.Publisher)(nil)
)

// allFailed is the outcome of a batch of n rows that failed together.
func allFailed(n int, err error) []error {
	errs := make([]error, n)
	for i := range errs {
		errs[i] = err
	}
	return errs
}

// rowPublisher publishes a batch of rows to one exchange and returns one
// outcome per row (nil: confirmed); ctx bounds the waits.
type rowPublisher func(ctx context.Context, exchange string, rows []*pending) []error

// publishRows returns how the relay publishes a batch with pub: one
// PublishPrepared call of publishings made straight from the rows when pub
// has it (*publisher.Publisher); else one PublishEach call of Watermill
// messages when pub has that; else one Publish call, whose error fails
// every row of the batch (they are published again, which the consumers'
// inboxes absorb). The three carry the same AMQP message (toPublishing
// makes what the Marshaler makes of toMessage).
func publishRows(pub message.Publisher) rowPublisher {
	checked := func(exchange string, n int, errs []error) []error {
		if len(errs) != n { // a publisher that breaks its contract: publish again
			return allFailed(n, fmt.Errorf("publish to exchange %q: the publisher reported %d outcomes for %d messages", exchange, len(errs), n))
		}
		return errs
	}
	messages := func(ctx context.Context, rows []*pending) []*message.Message {
		msgs := make([]*message.Message, len(rows))
		for i, p := range rows {
			msgs[i] = toMessage(&p.row)
			msgs[i].SetContext(ctx)
		}
		return msgs
	}
	switch pp := pub.(type) {
	case preparedPublisher:
		return func(ctx context.Context, exchange string, rows []*pending) []error {
			pubs := make([]publisher.Prepared, len(rows))
			for i, p := range rows {
				pubs[i] = toPublishing(&p.row)
			}
			return checked(exchange, len(rows), pp.PublishPrepared(ctx, exchange, pubs))
		}
	case eachPublisher:
		return func(ctx context.Context, exchange string, rows []*pending) []error {
			return checked(exchange, len(rows), pp.PublishEach(exchange, messages(ctx, rows)...))
		}
	}
	return func(ctx context.Context, exchange string, rows []*pending) []error {
		if err := pub.Publish(exchange, messages(ctx, rows)...); err != nil {
			return allFailed(len(rows), err)
		}
		return make([]error, len(rows))
	}
}

// Abort makes a running Run give up on outstanding confirms at once: their
// rows stay unpublished and are published again by the next relay.
func (r *Relay) Abort() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.abort != nil {
		r.abort()
	}
}

// Ready reports whether the relay can work: the database takes a write
// (sql.ProbeWrite: the write lock is free within Config.ProbeWait) and the
// publisher is connected to the broker (when it says: a
// *publisher.Publisher does). A standby relay is ready too; it takes over
// at once. Serve it on /readyz with publisher.OpsHandler.
func (r *Relay) Ready(ctx context.Context) error {
	var errs []error
	if err := wsql.ProbeWrite(ctx, r.cfg.DB, r.cfg.ProbeWait); err != nil {
		errs = append(errs, err)
	}
	if p, ok := r.cfg.Publisher.(interface{ Ready() error }); ok {
		if err := p.Ready(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Marked returns how many rows this relay marked published so far.
func (r *Relay) Marked() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.marked
}
