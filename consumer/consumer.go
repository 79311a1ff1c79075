package consumer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

// Errors of Start and Stop, for errors.Is.
var (
	// ErrStarted: Start was called on a consumer that started before.
	ErrStarted = errors.New("consumer was started before: make a new one with New")
	// ErrStopAborted: Stop's context ended before in-flight handlers
	// finished; they were cancelled and their deliveries go back to the
	// queue.
	ErrStopAborted = errors.New("consumer stop aborted: in-flight deliveries were requeued")
)

// failureBackoff is how long a delivery whose failure could not be
// published (broker trouble) waits before it is requeued.
const failureBackoff = time.Second

// Consumer reads a consumer application's queue and turns each delivery
// into an inbox row and a handler call, committed together, then acks it.
// Failed deliveries go through immediate retries, retry queues and the
// poison queue per the contract.
//
// Deliveries are consumed on one channel with the Prefetch, at most
// Concurrency at a time, and handled under a Watermill Router; the inbox
// writes go through one committer that batches the ready deliveries into
// one transaction, and the acks of a batch go back as one multiple ack.
type Consumer struct {
	cfg     Config
	handler Handler
	log     *slog.Logger

	mu      sync.Mutex
	started bool
	stopped chan struct{} // closed when the consumer has stopped
	stopErr error
	stopReq chan struct{} // closed to ask for a clean stop
	once    sync.Once

	// Set by Start.
	pub       *publisher.Publisher
	sub       *subscriber
	com       *committer
	abort     context.CancelFunc // cancels handler contexts
	base      context.Context
	aborting  atomic.Bool
	handlers  sync.WaitGroup // handle calls in progress
	inFlight  atomic.Int64
	autoAckCh chan struct{} // bounds concurrency under AutoAck
	cancelRun context.CancelFunc
	routerOut chan error
	pruner    *pruner // prunes the inbox (Config.Retention)
}

// New validates cfg and returns a Consumer for handler (Inbox for an
// audit-only consumer, HTTPSink, or the application's own). It does not
// connect: Start or Run does.
func New(cfg Config, handler Handler) (*Consumer, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if handler == nil {
		return nil, errors.New("consumer handler is nil: use consumer.Inbox for an audit-only consumer")
	}
	c := &Consumer{
		cfg:     cfg,
		handler: traced(handler, cfg.TracerProvider, cfg.Consumer),
		log:     cfg.Logger.With("consumer", cfg.Consumer),
		stopped: make(chan struct{}),
		stopReq: make(chan struct{}),
	}
	if cfg.Metrics != nil {
		cfg.Metrics.attach(c)
	}
	return c, nil
}

// Config returns the consumer's configuration, defaults filled in.
func (c *Consumer) Config() Config { return c.cfg }

// Run starts the consumer and consumes until ctx is cancelled, then stops
// cleanly (see Stop) and returns nil; it returns an error when the start
// fails. A consumer runs once.
func (c *Consumer) Run(ctx context.Context) error {
	if err := c.Start(ctx); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case <-c.stopped:
	}
	return c.Stop(context.Background())
}

// Start connects, checks the database schema, declares (or verifies) the
// topology and starts consuming; ctx bounds the start only. It returns when
// deliveries flow, or with the error that prevented it. A consumer starts
// once: a second Start returns ErrStarted.
func (c *Consumer) Start(ctx context.Context) (err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started {
		return ErrStarted
	}
	c.started = true
	defer func() {
		if err != nil {
			c.finish(err)
		}
	}()
	if err := wsql.Check(ctx, c.cfg.DB); err != nil {
		return fmt.Errorf("consumer %s: %w", c.cfg.Consumer, err)
	}
	pub, err := publisher.New(publisher.Config{
		Connection: c.cfg.Connection,
		Unroutable: publisher.UnroutableKeep, // a missing retry or poison queue must not drop the message
		Logger:     c.log,
	})
	if err != nil {
		return err
	}
	if err := pub.Connect(ctx); err != nil {
		_ = pub.Close()
		return fmt.Errorf("consumer %s: %w", c.cfg.Consumer, err)
	}
	queue := publisher.QueueName(c.cfg.Consumer)
	builder := NewTopologyBuilder(c.cfg, nil)
	sub := newSubscriber(c.cfg, builder.buildOn, c.log)
	// Connect and declare (or verify) now, for a clear error before
	// anything runs.
	if _, err := sub.connect(ctx); err != nil {
		_ = sub.Close()
		_ = pub.Close()
		return fmt.Errorf("consumer %s: %w", c.cfg.Consumer, err)
	}

	base, abort := context.WithCancel(context.WithoutCancel(ctx))
	c.base, c.abort = base, abort
	c.pub, c.sub = pub, sub
	c.com = newCommitter(base, c.cfg.DB, c.handler, c.cfg.HandlerTimeout, c.cfg.Concurrency, c.log)
	go c.com.loop()
	if c.cfg.AutoAck {
		c.autoAckCh = make(chan struct{}, c.cfg.Concurrency)
		c.log.Warn("auto_ack is on: deliveries are acked before their handler runs, so a delivery whose handler fails, or that is in flight when the process dies, is lost")
	}

	router, err := message.NewRouter(message.RouterConfig{
		// Never reached on a clean stop: handlers finish within the
		// handler timeout and the committer abandons the ones that do not.
		CloseTimeout: c.cfg.HandlerTimeout + abandonGrace + 10*time.Second,
	}, watermillLogger{c.log})
	if err != nil {
		c.teardown()
		return err
	}
	if c.cfg.Metrics != nil {
		c.cfg.Metrics.router.instrument(router)
	}
	router.AddConsumerHandler("warren-"+c.cfg.Consumer, queue, sub, c.handle)
	runCtx, cancelRun := context.WithCancel(context.Background())
	c.cancelRun = cancelRun
	c.routerOut = make(chan error, 1)
	go func() { c.routerOut <- router.Run(runCtx) }()
	select {
	case <-router.Running():
	case err := <-c.routerOut:
		cancelRun()
		c.teardown()
		if err == nil {
			err = errors.New("router stopped at once")
		}
		return fmt.Errorf("consumer %s: %w", c.cfg.Consumer, err)
	case <-ctx.Done():
		cancelRun()
		<-c.routerOut
		c.teardown()
		return fmt.Errorf("consumer %s: start: %w", c.cfg.Consumer, ctx.Err())
	}
	c.pruner = c.startPruner()
	go c.watch()
	c.log.Info("consumer started", "queue", queue, "concurrency", c.cfg.Concurrency, "prefetch", c.cfg.Prefetch,
		"queue_type", string(c.cfg.QueueType), "url", publisher.RedactURL(c.cfg.Connection.URL))
	return nil
}

// watch waits for a stop request or for the router to stop by itself, and
// stops the consumer.
func (c *Consumer) watch() {
	var err error
	select {
	case <-c.stopReq:
		c.cancelRun()
		err = <-c.routerOut
	case err = <-c.routerOut:
		if err == nil {
			err = errors.New("every subscription stopped")
		}
		err = fmt.Errorf("consumer %s stopped: %w", c.cfg.Consumer, err)
		c.log.Error("consumer stopped by itself", "error", err)
	}
	// The router returns once every subscription finished its delivery in
	// flight (acked) and stopped; handlers that outlived the router's close
	// timeout still run: wait for them before closing what they use.
	c.handlers.Wait()
	c.teardown()
	c.finish(err)
}

// teardown closes the subscriber, the committer and the publisher.
func (c *Consumer) teardown() {
	c.pruner.stop()
	if c.sub != nil {
		_ = c.sub.Close()
	}
	if c.com != nil {
		c.com.close()
	}
	if c.pub != nil {
		_ = c.pub.Close()
	}
	if c.abort != nil {
		c.abort()
	}
}

func (c *Consumer) finish(err error) {
	c.once.Do(func() {
		c.stopErr = err
		close(c.stopped)
	})
}

// Stop stops the consumer cleanly: no new delivery starts, the deliveries in
// flight finish (handler, commit, ack, or their failure path) and nothing
// is dead-lettered. If ctx ends first, Stop aborts: handler contexts are
// cancelled and the unfinished deliveries go back to the queue; it then
// returns ErrStopAborted. Stop is safe to call more than once, and before
// Start.
func (c *Consumer) Stop(ctx context.Context) error {
	c.mu.Lock()
	started := c.started
	c.started = true // a Start after Stop is refused
	c.mu.Unlock()
	if !started {
		c.finish(nil)
		return nil
	}
	select {
	case <-c.stopReq:
	default:
		close(c.stopReq)
	}
	select {
	case <-c.stopped:
		return c.stopErr
	case <-ctx.Done():
	}
	c.aborting.Store(true)
	if c.abort != nil {
		c.abort()
	}
	if c.sub != nil {
		c.sub.abort() // unacked deliveries are requeued
	}
	<-c.stopped
	return ErrStopAborted
}

// Stopped is closed when the consumer has stopped, after Stop or by itself
// (the error of Err says why).
func (c *Consumer) Stopped() <-chan struct{} { return c.stopped }

// Err returns why the consumer stopped: nil after a clean stop.
func (c *Consumer) Err() error {
	select {
	case <-c.stopped:
		return c.stopErr
	default:
		return nil
	}
}

// handle is the Router's handler for one delivery. It returns nil to ack
// and an error to nack with requeue, which it does only when the failure
// path could not publish (broker trouble) or on abort. It settles the
// delivery itself, as it returns (unless the committer settled it
// before), rather than leaving that to a goroutine per delivery waiting
// for the Router's ack: the Router calls handle for every message the
// subscriber hands out and acks exactly when handle returns nil.
func (c *Consumer) handle(msg *message.Message) (err error) {
	defer func() { settle(msg, err == nil) }() // last, after the recover below
	c.handlers.Add(1)
	defer c.handlers.Done()
	c.track(1)
	defer c.track(-1)
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("consumer bug: panic while handling a delivery", "message_id", msg.UUID, "panic", r, "stack", string(debug.Stack()))
			err = c.requeue(fmt.Errorf("panic: %v", r))
		}
	}()
	if c.cfg.Hooks.Delivered != nil {
		c.cfg.Hooks.Delivered()
	}
	if c.autoAckCh != nil {
		c.autoAckCh <- struct{}{}
		defer func() { <-c.autoAckCh }()
		settle(msg, true)
	}
	d, reason := c.parse(msg, time.Now())
	if reason != "" {
		return c.poison(d, reason, d.trips, nil, false)
	}
	return c.deliver(d)
}

func (c *Consumer) track(delta int64) {
	n := c.inFlight.Add(delta)
	if c.cfg.Hooks.InFlight != nil {
		c.cfg.Hooks.InFlight(int(n))
	}
}

// deliver runs the handler and the failure path for a well-formed delivery.
// The common case (a first delivery whose handler succeeds) stays in this
// function and run; the rest is in functions of their own, which keeps
// the stack of the Router's goroutine for each delivery small (a stack
// that outgrows its start is copied, once per delivery).
func (c *Consumer) deliver(d *Delivery) error {
	prior := d.trips // runs made before this copy was published
	redelivered := d.redelivered()
	if redelivered {
		var err error
		var done bool
		if prior, done, err = c.redelivery(d, prior); done {
			return err
		}
	}
	if done, err := c.refuse(d, prior, redelivered); done {
		return err
	}
	d.Attempt = prior + 1
	if redelivered && !c.cfg.AutoAck {
		if err := c.recordStarted(d); err != nil {
			return c.requeue(err)
		}
	}
	for immediate := 0; ; immediate++ {
		// A failure is recorded retrying: the row becomes poisoned only
		// once the poison queue confirmed the copy (until then a
		// redelivery must still count this run).
		failStatus := inbox.StatusRetrying
		dropping := c.cfg.AutoAck && immediate >= c.cfg.immediateRetries()
		if dropping {
			failStatus = inbox.StatusPoisoned
		}
		res := c.run(d, failStatus)
		switch res.outcome {
		case outcomeOK:
			return nil
		case outcomeDuplicate:
			if c.cfg.Hooks.Duplicate != nil {
				c.cfg.Hooks.Duplicate()
			}
			return nil
		}
		var again bool
		var err error
		if d, again, err = c.failed(d, &res, immediate, dropping, failStatus); !again {
			return err
		}
	}
}

// redelivery looks up a redelivered copy in the inbox. An earlier delivery
// of this copy ended without an ack: a crash, a lost connection, a stop,
// or a failure whose retry could not be published. It counts the runs the
// inbox saw start or fail; a delivery that was only prefetched does not
// count (nor a first run that killed the process, which nothing recorded:
// a message that kills the process every time is poisoned one crash
// later). done: the delivery is settled with err (a duplicate, or a
// requeue).
func (c *Consumer) redelivery(d *Delivery, prior int) (runs int, done bool, err error) {
	st, found, err := inbox.Lookup(c.base, c.cfg.DB, d.Consumer, d.MessageID)
	if err != nil {
		return 0, true, c.requeue(err)
	}
	if found && st.Status == inbox.StatusProcessed {
		return 0, true, c.duplicate(d)
	}
	return max(prior, st.LastAttempt), false, nil
}

// refuse parks a delivery out of attempts, or expired, in the poison
// queue; done says it did.
func (c *Consumer) refuse(d *Delivery, prior int, redelivered bool) (done bool, err error) {
	if prior >= c.cfg.MaxAttempts {
		var last error
		if redelivered && prior > d.trips {
			last = fmt.Errorf("the last %d runs never finished or their retry was not published (does the handler crash the process?)", prior-d.trips)
		} else if h := d.Headers[publisher.HeaderError]; h != "" {
			last = errors.New(h)
		}
		return true, c.poison(d, ReasonMaxAttempts, prior, last, false)
	}
	if c.cfg.Expiration > 0 && !d.arrivedAt.IsZero() && time.Since(d.arrivedAt) > c.cfg.Expiration {
		return true, c.poison(d, ReasonExpired, prior, fmt.Errorf("waited %s in queue %s, longer than the expiration %s",
			time.Since(d.arrivedAt).Round(time.Second), publisher.QueueName(c.cfg.Consumer), c.cfg.Expiration), false)
	}
	return false, nil
}

func (c *Consumer) recordStarted(d *Delivery) error {
	return c.record(d, func(ctx context.Context, e inbox.Execer) error {
		return inbox.RecordStarted(ctx, e, &d.Delivery, d.Attempt)
	})
}

// failed takes a failed handler run on: it records the failure (unless
// the committer did), then drops the delivery (auto_ack), parks it in the
// poison queue (last attempt), sends it to a retry queue, or asks for an
// immediate retry (again, with the Delivery to run: a copy when the
// handler was abandoned and may still read the first).
func (c *Consumer) failed(d *Delivery, res *jobResult, immediate int, dropping bool, failStatus inbox.Status) (next *Delivery, again bool, err error) {
	if res.abandoned {
		cp := *d
		d = &cp
	}
	if c.aborting.Load() {
		return d, false, c.requeue(res.err)
	}
	if !res.recorded {
		if err := c.record(d, func(ctx context.Context, e inbox.Execer) error {
			return inbox.RecordFailure(ctx, e, &d.Delivery, d.Attempt, res.err, failStatus)
		}); err != nil {
			c.log.Error("cannot record a failed attempt", "message_id", d.MessageID, "error", err)
		}
	}
	if d.FirstFailedAt.IsZero() {
		d.FirstFailedAt = time.Now()
	}
	switch {
	case dropping:
		c.log.Error("handler failed; the delivery is dropped (auto_ack)", "message_id", d.MessageID, "attempt", d.Attempt, "error", res.err)
		c.poisonedHook(ReasonAutoAck)
		return d, false, nil
	case d.Attempt >= c.cfg.MaxAttempts:
		return d, false, c.poison(d, ReasonMaxAttempts, d.Attempt, res.err, false)
	case immediate < c.cfg.immediateRetries():
		c.log.Debug("handler failed; retrying at once", "message_id", d.MessageID, "attempt", d.Attempt, "error", res.err)
		d.Attempt++
		return d, true, nil
	}
	return d, false, c.retry(d, res.err)
}

// run makes one handler run: Prepare outside the transaction when the
// handler has one, then the committer.
func (c *Consumer) run(d *Delivery, failStatus inbox.Status) jobResult {
	var prepared time.Duration
	if p, ok := c.handler.(Preparer); ok {
		done, err := inbox.Processed(c.base, c.cfg.DB, d.Consumer, d.MessageID)
		if err == nil && done {
			res := c.com.submit(&job{kind: jobRecord, d: d, record: func(ctx context.Context, e inbox.Execer) error {
				return inbox.RecordDuplicate(ctx, e, d.Consumer, d.MessageID)
			}})
			if res.outcome == outcomeOK {
				return jobResult{outcome: outcomeDuplicate}
			}
		}
		start := time.Now()
		err = c.prepare(p, d)
		prepared = time.Since(start)
		if err != nil {
			c.observe(prepared)
			return jobResult{outcome: outcomeFailed, err: err}
		}
	}
	row, err := inbox.EncodeProcessed(&d.Delivery, d.Attempt)
	if err != nil {
		return jobResult{outcome: outcomeFailed, err: err}
	}
	res := c.com.submit(&job{kind: jobHandle, d: d, failStatus: failStatus, row: row})
	if res.outcome != outcomeDuplicate {
		c.observe(prepared + res.took)
	}
	return res
}

func (c *Consumer) observe(took time.Duration) {
	if c.cfg.Hooks.HandlerDuration != nil {
		c.cfg.Hooks.HandlerDuration(took)
	}
}

// prepare runs p.Prepare with the handler timeout, turning a panic into an
// error and giving up on a Prepare that ignores its deadline.
func (c *Consumer) prepare(p Preparer, d *Delivery) error {
	ctx, cancel := context.WithTimeout(c.base, c.cfg.HandlerTimeout)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				c.log.Error("handler panicked", "message_id", d.MessageID, "panic", r, "stack", string(debug.Stack()))
				done <- fmt.Errorf("handler panicked: %v", r)
			}
		}()
		done <- p.Prepare(ctx, d)
	}()
	timer := time.NewTimer(c.cfg.HandlerTimeout + abandonGrace)
	defer timer.Stop()
	select {
	case err := <-done:
		return err
	case <-timer.C:
		return fmt.Errorf("handler did not return within the handler timeout %s (it ignores its context)", c.cfg.HandlerTimeout)
	}
}

// record runs f in the committer's next transaction.
func (c *Consumer) record(d *Delivery, f func(context.Context, inbox.Execer) error) error {
	res := c.com.submit(&job{kind: jobRecord, d: d, record: f})
	if res.outcome != outcomeOK {
		return res.err
	}
	return nil
}

func (c *Consumer) duplicate(d *Delivery) error {
	if err := c.record(d, func(ctx context.Context, e inbox.Execer) error {
		return inbox.RecordDuplicate(ctx, e, d.Consumer, d.MessageID)
	}); err != nil {
		c.log.Warn("cannot count a duplicate", "message_id", d.MessageID, "error", err)
	}
	if c.cfg.Hooks.Duplicate != nil {
		c.cfg.Hooks.Duplicate()
	}
	return nil
}

// retry publishes d to the retry queue of its trip, with confirms, and acks
// the original (returns nil) once the broker confirmed.
func (c *Consumer) retry(d *Delivery, cause error) error {
	trip := (d.Attempt + c.cfg.immediateRetries()) / (1 + c.cfg.immediateRetries()) // ceil(attempt / runs per trip)
	delay := c.cfg.retryDelay(trip)
	out := c.copyOf(d, publisher.RetryQueueName(c.cfg.Consumer, delay), d.Attempt, cause)
	if err := c.publish(out); err != nil {
		c.log.Error("cannot publish a failed delivery to its retry queue; requeueing it", "message_id", d.MessageID, "error", err)
		return c.requeue(err)
	}
	c.log.Info("handler failed; delivery sent to a retry queue", "message_id", d.MessageID, "attempt", d.Attempt,
		"delay", delay, "error", inbox.ErrorLine(cause))
	if c.cfg.Hooks.Retried != nil {
		c.cfg.Hooks.Retried()
	}
	return nil
}

// poison publishes d to the poison queue with reason, then records the
// inbox row poisoned (unless recorded already) and acks the original.
func (c *Consumer) poison(d *Delivery, reason string, attempts int, cause error, recorded bool) error {
	out := c.copyOf(d, publisher.PoisonQueueName(c.cfg.Consumer), attempts, cause)
	out.Metadata.Set(publisher.HeaderPoisonReason, reason)
	if out.UUID == "" {
		// The publisher requires a message id; the reason says there was
		// none.
		out.UUID = watermill.NewUUID()
	}
	if c.cfg.AutoAck {
		// Acked already: publishing is best effort.
		if err := c.publish(out); err != nil {
			c.log.Error("cannot publish a delivery to the poison queue; it is lost (auto_ack)", "message_id", d.MessageID, "reason", reason, "error", err)
		}
	} else if err := c.publish(out); err != nil {
		c.log.Error("cannot publish a delivery to the poison queue; requeueing it", "message_id", d.MessageID, "reason", reason, "error", err)
		return c.requeue(err)
	}
	if !recorded && d.MessageID != "" {
		// last_error: the handler's last error when it ran out of
		// attempts, else the reason with its detail.
		detail := reason
		switch {
		case cause == nil || cause.Error() == "":
		case reason == ReasonMaxAttempts:
			detail = cause.Error()
		default:
			detail = reason + ": " + cause.Error()
		}
		keepBody := reasonKind(reason) != ReasonTooLarge
		if err := c.record(d, func(ctx context.Context, e inbox.Execer) error {
			return inbox.RecordPoisoned(ctx, e, &d.Delivery, attempts, detail, keepBody)
		}); err != nil {
			c.log.Error("cannot record a poisoned delivery in the inbox (it is in the poison queue)", "message_id", d.MessageID, "error", err)
		}
	}
	c.log.Warn("delivery parked in the poison queue", "message_id", d.MessageID, "reason", reason, "attempts", attempts)
	c.poisonedHook(reasonKind(reason))
	return nil
}

func (c *Consumer) poisonedHook(kind string) {
	if c.cfg.Hooks.Poisoned != nil {
		c.cfg.Hooks.Poisoned(kind)
	}
}

// copyOf returns a message to publish to queue through the default
// exchange: the original properties, headers and body, with the failure
// headers of the contract.
func (c *Consumer) copyOf(d *Delivery, queue string, attempts int, cause error) *message.Message {
	// The original's properties and headers, as the publisher's marshaler
	// publishes them again.
	out, err := publisher.Marshaler{}.Unmarshal(*d.raw)
	if err != nil { // only for the zero delivery, which is never handed out
		out = message.NewMessage(d.MessageID, d.Body)
	}
	out.UUID, out.Payload = d.MessageID, d.Body
	md := out.Metadata
	md.Set(publisher.MetaRoutingKey, queue)
	md.Set(publisher.HeaderAttempt, strconv.Itoa(attempts))
	if cause != nil {
		md.Set(publisher.HeaderError, inbox.ErrorLine(cause))
	}
	first := d.FirstFailedAt
	if first.IsZero() {
		first = time.Now()
	}
	md.Set(publisher.HeaderFirstFailedAt, first.UTC().Format(time.RFC3339Nano))
	if md.Get(publisher.HeaderOriginalExchange) == "" && md.Get(publisher.HeaderOriginalRouting) == "" {
		md.Set(publisher.HeaderOriginalExchange, d.Exchange)
		md.Set(publisher.HeaderOriginalRouting, d.RoutingKey)
	}
	return out
}

// publish publishes msg with confirms through the default exchange.
func (c *Consumer) publish(msg *message.Message) error {
	ctx, cancel := context.WithTimeout(c.base, time.Minute)
	defer cancel()
	msg.SetContext(ctx)
	return c.pub.Publish("", msg)
}

// requeue makes the Router nack the delivery with requeue, after a pause so
// that broker or database trouble does not spin. Under AutoAck the
// delivery was acked already: it is lost, and said so.
func (c *Consumer) requeue(err error) error {
	if c.cfg.AutoAck {
		c.log.Error("delivery lost (auto_ack): it was acked before it could be handled", "error", err)
		return nil
	}
	if !c.aborting.Load() {
		select {
		case <-time.After(failureBackoff):
		case <-c.stopReq:
		case <-c.base.Done():
		}
	}
	return fmt.Errorf("requeued: %w", err)
}
