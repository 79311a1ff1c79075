package publisher

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/cenkalti/backoff/v5"
	amqp "github.com/rabbitmq/amqp091-go"
)

// Publisher defaults.
const (
	// DefaultWindow is the number of publishes that may await their confirm
	// at once, shared by all callers.
	DefaultWindow = 512
	// DefaultConfirmTimeout bounds the wait for a confirm, and for a
	// connection while disconnected.
	DefaultConfirmTimeout = 30 * time.Second
	// DefaultCloseTimeout bounds how long Close waits for outstanding confirms.
	DefaultCloseTimeout = 10 * time.Second
	// DefaultReconnectMin is the first delay between reconnection attempts.
	DefaultReconnectMin = 100 * time.Millisecond
	// DefaultReconnectMax caps the delay between reconnection attempts.
	DefaultReconnectMax = 15 * time.Second
	// DefaultUnroutableLogInterval is the least time between two log lines
	// about unroutable messages.
	DefaultUnroutableLogInterval = 10 * time.Second
)

// Errors returned (wrapped) by Publish, for errors.Is.
var (
	// ErrClosed: the publisher was closed.
	ErrClosed = errors.New("publisher is closed")
	// ErrConnectionLost: the connection or channel broke, or no connection
	// came up in time, before the broker confirmed the message. The message
	// may or may not have reached the broker: publish it again.
	ErrConnectionLost = errors.New("connection to the broker lost")
	// ErrNacked: the broker refused to take responsibility for the message.
	ErrNacked = errors.New("broker nacked the message")
	// ErrUnroutable: the broker returned the message because no queue is
	// bound for its routing key (only with UnroutableKeep).
	ErrUnroutable = errors.New("message is unroutable")
	// ErrInvalidMessage: the message cannot be published as it is (a
	// property longer than AMQP allows, an expiration that is not a number
	// of milliseconds); publishing it again will not help. Such a message
	// is refused before anything is sent, because the broker or amqp091
	// would otherwise close the channel or the connection and fail every
	// other outstanding publish with it.
	ErrInvalidMessage = errors.New("message cannot be published")
)

// UnroutablePolicy says what Publish does with a message the broker returns
// because no queue is bound for its routing key.
type UnroutablePolicy int

const (
	// UnroutableCount counts the message (OnUnroutable, Stats.Returned),
	// logs it (rate-limited) and lets Publish succeed: nobody subscribed to
	// that event, which is normal for an event stream.
	UnroutableCount UnroutablePolicy = iota
	// UnroutableKeep makes Publish fail with an error wrapping
	// ErrUnroutable, so that the caller keeps the message (the outbox row)
	// and publishes it again later.
	UnroutableKeep
)

// String returns the policy's name: "count" or "keep".
func (u UnroutablePolicy) String() string {
	switch u {
	case UnroutableCount:
		return "count"
	case UnroutableKeep:
		return "keep"
	}
	return fmt.Sprintf("UnroutablePolicy(%d)", int(u))
}

// Config configures a Publisher.
type Config struct {
	// Connection says how to reach the broker; see ConnectionConfig for its
	// defaults.
	Connection ConnectionConfig
	// Window is the number of publishes that may await their confirm at
	// once, shared by all concurrent callers. Default DefaultWindow (512).
	Window int
	// ConfirmTimeout bounds the wait for the broker's confirm of a
	// publish, and the wait for a connection while disconnected. The clock
	// stops while the broker blocks the connection (memory or disk alarm).
	// A confirm overdue on a connection that is not blocked breaks the
	// connection: every outstanding publish fails with ErrConnectionLost
	// and the publisher reconnects. Default DefaultConfirmTimeout (30s).
	ConfirmTimeout time.Duration
	// CloseTimeout bounds how long Close waits for outstanding confirms.
	// Default DefaultCloseTimeout (10s).
	CloseTimeout time.Duration
	// ReconnectMin is the first delay between reconnection attempts; it
	// grows exponentially up to ReconnectMax. Default DefaultReconnectMin
	// (100ms).
	ReconnectMin time.Duration
	// ReconnectMax caps the delay between reconnection attempts. Default
	// DefaultReconnectMax (15s).
	ReconnectMax time.Duration
	// NoDeclare makes the publisher only check, with a passive declare, that
	// an exchange exists before its first publish, instead of declaring it.
	// A publish to a missing exchange then fails with ErrExchangeMissing.
	// Default false: declare each exchange as a durable topic exchange.
	NoDeclare bool
	// Unroutable says what a publish returned by the broker as unroutable
	// does. Default UnroutableCount.
	Unroutable UnroutablePolicy
	// OnConfirmed, if set, is called for every message the broker
	// confirmed and routed to at least one queue, with n = 1 and the time
	// from its publish to its confirm. It must be quick and safe for
	// concurrent use. Default: none.
	OnConfirmed func(exchange string, n int, latency time.Duration)
	// OnUnroutable, if set, is called for every message the broker returned
	// as unroutable, under either UnroutablePolicy. It must be quick and safe for concurrent use. Default:
	// none.
	OnUnroutable func(exchange, routingKey, messageID string)
	// Logger receives the publisher's few log lines: connection state
	// changes, blocked connections, unroutable messages. Default
	// slog.Default().
	Logger *slog.Logger
	// UnroutableLogInterval is the least time between two log lines about
	// unroutable messages. Default DefaultUnroutableLogInterval (10s).
	UnroutableLogInterval time.Duration
}

// WithDefaults returns a copy of c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	c.Connection = c.Connection.WithDefaults()
	if c.Window == 0 {
		c.Window = DefaultWindow
	}
	if c.ConfirmTimeout == 0 {
		c.ConfirmTimeout = DefaultConfirmTimeout
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = DefaultCloseTimeout
	}
	if c.ReconnectMin == 0 {
		c.ReconnectMin = DefaultReconnectMin
	}
	if c.ReconnectMax == 0 {
		c.ReconnectMax = DefaultReconnectMax
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.UnroutableLogInterval == 0 {
		c.UnroutableLogInterval = DefaultUnroutableLogInterval
	}
	return c
}

// Validate checks c (after WithDefaults) and returns a plain-English error
// that names the setting at fault.
func (c Config) Validate() error {
	c = c.WithDefaults()
	if err := c.Connection.Validate(); err != nil {
		return err
	}
	switch {
	case c.Window < 1:
		return fmt.Errorf("publisher window is %d: it must be at least 1", c.Window)
	case c.ConfirmTimeout < 0:
		return fmt.Errorf("publisher confirm timeout is %s: it must be positive", c.ConfirmTimeout)
	case c.CloseTimeout < 0:
		return fmt.Errorf("publisher close timeout is %s: it must be positive", c.CloseTimeout)
	case c.ReconnectMin < 0:
		return fmt.Errorf("publisher reconnect min delay is %s: it must be positive", c.ReconnectMin)
	case c.ReconnectMax < c.ReconnectMin:
		return fmt.Errorf("publisher reconnect max delay %s is less than the min delay %s", c.ReconnectMax, c.ReconnectMin)
	case c.Unroutable != UnroutableCount && c.Unroutable != UnroutableKeep:
		return fmt.Errorf("publisher unroutable policy %d is unknown: use UnroutableCount or UnroutableKeep", int(c.Unroutable))
	case c.UnroutableLogInterval < 0:
		return fmt.Errorf("publisher unroutable log interval is %s: it must be positive", c.UnroutableLogInterval)
	}
	return nil
}

// Stats are a Publisher's counters since New.
type Stats struct {
	Published      uint64 // messages written to the channel
	Confirmed      uint64 // acked by the broker and routed to a queue
	Returned       uint64 // returned by the broker as unroutable (and acked)
	Nacked         uint64 // nacked by the broker
	Failed         uint64 // awaiting a confirm when the connection was lost
	Outstanding    int    // awaiting a confirm now
	MaxOutstanding int    // the most that awaited a confirm at once
	Connects       uint64 // connections made, the first one included
	Connected      bool   // a connection is up now
	Blocked        bool   // the broker blocks the connection now
}

// Publisher publishes Watermill messages to RabbitMQ with publisher
// confirms and returns from Publish only when the broker has confirmed every
// message, or when it failed. Many goroutines may call Publish at once;
// their publishes share one confirm-mode channel and are pipelined up to
// Config.Window outstanding confirms. Topic is the exchange name ("" is the
// default exchange); the routing key is the metadata MetaRoutingKey; the
// properties come from Marshaler. Messages are published mandatory, so an
// unroutable message is never silently dropped (see UnroutablePolicy).
//
// The publisher connects on Connect or on the first Publish and reconnects
// by itself, with exponential backoff, when the connection breaks; a Publish
// made meanwhile waits for the new connection.
type Publisher struct {
	cfg Config
	log *slog.Logger
	url string // redacted

	window chan struct{} // one token per outstanding confirm

	mu     sync.Mutex
	sess   *session
	ready  chan struct{} // closed (and replaced) whenever a session is installed
	wanted bool          // someone asked for a connection: keep one up
	closed bool
	// closedFlag mirrors closed for the checks made per message (isClosed,
	// the writer), which take no lock.
	closedFlag atomic.Bool
	lastErr    error // the last failed connection attempt
	everUp     bool
	lostSince  time.Time

	dialLock chan struct{} // serializes connection attempts
	wake     chan struct{}
	closing  chan struct{}
	once     sync.Once
	wg       sync.WaitGroup

	published, confirmed, returned, nacked, failed, connects atomic.Uint64
	maxOutstanding                                           atomic.Int64

	unroutableLog struct {
		sync.Mutex
		last       time.Time
		suppressed int
	}
}

var _ message.Publisher = (*Publisher)(nil)

// New validates cfg and returns a Publisher. It does not connect: call
// Connect to connect now and fail fast, or let the first Publish connect.
func New(cfg Config) (*Publisher, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := &Publisher{
		cfg:      cfg,
		log:      cfg.Logger,
		url:      RedactURL(cfg.Connection.URL),
		window:   make(chan struct{}, cfg.Window),
		ready:    make(chan struct{}),
		dialLock: make(chan struct{}, 1),
		wake:     make(chan struct{}, 1),
		closing:  make(chan struct{}),
	}
	p.wg.Add(1)
	go p.run()
	return p, nil
}

// Connect connects to the broker now unless a connection is up, and returns
// Dial's error when that fails (one clear line; see Dial). After a success
// the publisher keeps a connection up, reconnecting by itself, until Close.
func (p *Publisher) Connect(ctx context.Context) error {
	err := p.connect(ctx)
	if err == nil {
		p.want()
	}
	return err
}

// Connected reports whether a connection to the broker is up.
func (p *Publisher) Connected() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sess != nil && !p.sess.isDead()
}

// Stats returns the publisher's counters.
func (p *Publisher) Stats() Stats {
	st := Stats{
		Published:      p.published.Load(),
		Confirmed:      p.confirmed.Load(),
		Returned:       p.returned.Load(),
		Nacked:         p.nacked.Load(),
		Failed:         p.failed.Load(),
		MaxOutstanding: int(p.maxOutstanding.Load()),
		Connects:       p.connects.Load(),
	}
	p.mu.Lock()
	s := p.sess
	p.mu.Unlock()
	if s != nil && !s.isDead() {
		st.Connected = true
		s.mu.Lock()
		st.Outstanding = len(s.pending)
		st.Blocked = s.blocked
		s.mu.Unlock()
	}
	return st
}

// Publish publishes msgs to the exchange named topic ("" is the default
// exchange, which is never declared) and returns when the broker has
// confirmed all of them, or when one failed. Before the first publish to an
// exchange on a connection the exchange is declared (or only checked, with
// Config.NoDeclare).
//
// Each message waits at most Config.ConfirmTimeout for a connection and as
// long again for its confirm (not counting the time the broker blocks the
// connection), and no longer than its msg.Context(). The error joins one
// error per failed message, each naming the message id and wrapping
// ErrConnectionLost, ErrNacked, ErrUnroutable, ErrExchangeMissing,
// ErrClosed or the context's error. After an error the messages may or may
// not have reached the broker; publishing them again is safe for the
// idempotent consumers of the contract.
func (p *Publisher) Publish(topic string, msgs ...*message.Message) error {
	if err := p.checkCall(topic, len(msgs)); err != nil || len(msgs) == 0 {
		return err
	}
	items := make([]outgoing, len(msgs))
	for i, m := range msgs {
		pub, err := marshalChecked(topic, m)
		if err != nil {
			return err
		}
		items[i] = outgoing{ctx: m.Context(), key: m.Metadata.Get(MetaRoutingKey), pub: pub}
	}
	errs := p.publish(topic, items)
	// One line for the messages left unsent after a failure, not one each.
	var out []error
	skipped := 0
	for _, err := range errs {
		switch {
		case err == errNotTried:
			skipped++
		case err != nil:
			out = append(out, err)
		}
	}
	if skipped > 0 {
		out = append(out, fmt.Errorf("%d more messages of the call to exchange %q were not published after that error", skipped, topic))
	}
	return errors.Join(out...)
}

// PublishEach publishes msgs as Publish does and returns one error per
// message, in the order of msgs: nil when the broker confirmed it (and, under
// UnroutableCount, also when it returned it as unroutable), else why it may
// not have reached the broker. Unlike Publish, a message that cannot be
// marshaled fails alone and the others are published.
func (p *Publisher) PublishEach(topic string, msgs ...*message.Message) []error {
	return p.publishEach(topic, len(msgs), func(i int) (outgoing, error) {
		m := msgs[i]
		pub, err := marshalChecked(topic, m)
		return outgoing{ctx: m.Context(), key: m.Metadata.Get(MetaRoutingKey), pub: pub}, err
	})
}

// Prepared is one message of a PublishPrepared call: the AMQP publishing,
// as Marshaler makes it from a Watermill message, and its routing key.
type Prepared struct {
	RoutingKey string
	Publishing amqp.Publishing
}

// PublishPrepared publishes pubs to exchange as PublishEach publishes
// Watermill messages, and returns one error per publishing, in order. ctx
// bounds every wait as each message's context does for PublishEach. It
// exists for the relay, which builds the publishings straight from outbox
// rows: a Watermill message per row, its metadata map and its marshaling
// were a tenth of the relay's CPU time. A publishing that breaks AMQP's
// limits fails alone, with ErrInvalidMessage.
func (p *Publisher) PublishPrepared(ctx context.Context, exchange string, pubs []Prepared) []error {
	return p.publishEach(exchange, len(pubs), func(i int) (outgoing, error) {
		pp := &pubs[i]
		if pp.Publishing.MessageId == "" {
			return outgoing{}, fmt.Errorf("publish to exchange %q: %w: the publishing has no message_id", exchange, ErrInvalidMessage)
		}
		if err := checkPublishing(pp.RoutingKey, pp.Publishing); err != nil {
			return outgoing{}, fmt.Errorf("publish message %s to exchange %q: %w: %w", pp.Publishing.MessageId, exchange, ErrInvalidMessage, err)
		}
		return outgoing{ctx: ctx, key: pp.RoutingKey, pub: pp.Publishing}, nil
	})
}

// publishEach is PublishEach and PublishPrepared: item(i) makes the i-th
// of n publishings of the call, or says why it cannot be published; the
// others are published in order, and errs[i] is the outcome of the i-th.
func (p *Publisher) publishEach(topic string, n int, item func(i int) (outgoing, error)) []error {
	errs := make([]error, n)
	if err := p.checkCall(topic, n); err != nil {
		for i := range errs {
			errs[i] = err
		}
		return errs
	}
	items := make([]outgoing, 0, n)
	index := make([]int, 0, n)
	for i := range n {
		it, err := item(i)
		if err != nil {
			errs[i] = err
			continue
		}
		items, index = append(items, it), append(index, i)
	}
	if len(items) == 0 {
		return errs
	}
	for k, err := range p.publish(topic, items) {
		if err == errNotTried {
			err = fmt.Errorf("publish message %s to exchange %q: not published after an earlier message of the call failed", items[k].pub.MessageId, topic)
		}
		errs[index[k]] = err
	}
	return errs
}

// checkCall refuses a call on a closed publisher or with an exchange name
// AMQP cannot carry.
func (p *Publisher) checkCall(topic string, n int) error {
	if p.isClosed() {
		return fmt.Errorf("publish to exchange %q: %w", topic, ErrClosed)
	}
	if n > 0 && len(topic) > maxShortstr {
		return fmt.Errorf("publish to exchange %q: %w: the exchange name is longer than %d bytes", topic[:32]+"...", ErrInvalidMessage, maxShortstr)
	}
	return nil
}

// marshalChecked marshals m and checks the result against AMQP's limits.
func marshalChecked(topic string, m *message.Message) (amqp.Publishing, error) {
	pub, err := Marshaler{}.Marshal(m)
	if err != nil {
		return amqp.Publishing{}, fmt.Errorf("publish to exchange %q: %w: %w", topic, ErrInvalidMessage, err)
	}
	if err := checkPublishing(m.Metadata.Get(MetaRoutingKey), pub); err != nil {
		return amqp.Publishing{}, fmt.Errorf("publish message %s to exchange %q: %w: %w", m.UUID, topic, ErrInvalidMessage, err)
	}
	return pub, nil
}

// errNotTried marks, in publish's result, the messages of a call that were
// not queued because an earlier one could not be.
var errNotTried = errors.New("not tried")

// outgoing is one checked publishing of a call, with its routing key and
// the context that bounds its waits.
type outgoing struct {
	ctx context.Context
	key string
	pub amqp.Publishing
}

// publish queues items on one connection, in order, waits for their
// confirms and returns one error per item (errNotTried for those after one
// that could not be queued). OnConfirmed is called for each confirmed and
// routed message, with its own publish-to-confirm time.
func (p *Publisher) publish(topic string, items []outgoing) []error {
	p.want()

	// Queue the messages on one connection, in order, then wait for their
	// confirms. If the connection breaks before any of them was written,
	// the call starts again on the next connection; once one was written,
	// the rest are not sent on another connection (they would overtake it).
	errs := make([]error, len(items))
	pds := make([]*pending, len(items))
	var queued int
	for {
		var s *session
		var stopErr error
		queued = 0
		for i := range items {
			it := &items[i]
			pd, ss, err := p.enqueue(it.ctx, s, topic, it.key, it.pub)
			if err != nil {
				stopErr = fmt.Errorf("publish message %s to exchange %q: %w", it.pub.MessageId, topic, err)
				break
			}
			s, pds[i], queued = ss, pd, i+1
		}
		abandoned := false
		for i := range queued {
			if !p.await(items[i].ctx, pds[i]) {
				abandoned = true
			}
		}
		if queued > 0 && !abandoned && pds[0].unsent && !p.isClosed() {
			continue // nothing reached the wire: start again on the next connection
		}
		if stopErr != nil {
			errs[queued] = stopErr
			for j := queued + 1; j < len(items); j++ {
				errs[j] = errNotTried
			}
		}
		break
	}

	for i, pd := range pds[:queued] {
		switch {
		case pd.abandoned:
			errs[i] = fmt.Errorf("publish message %s to exchange %q: gave up waiting for the confirm: %w", pd.msgID, topic, context.Cause(items[i].ctx))
		case pd.unsent && p.isClosed():
			errs[i] = fmt.Errorf("publish message %s to exchange %q: %w", pd.msgID, topic, ErrClosed)
		case pd.unsent:
			errs[i] = fmt.Errorf("%s: %w", notWrittenAfterBreak, pd.err)
		default:
			if pd.returned && p.cfg.OnUnroutable != nil {
				p.cfg.OnUnroutable(pd.exchange, pd.key, pd.msgID) // counted under either policy
			}
			errs[i] = pd.err
			if pd.err == nil && !pd.returned && p.cfg.OnConfirmed != nil {
				p.cfg.OnConfirmed(topic, 1, pd.doneAt.Sub(pd.sentAt))
			}
		}
	}
	return errs
}

// Close waits up to Config.CloseTimeout for the outstanding confirms, then
// closes the connection and stops reconnecting. Publishes still waiting
// fail with ErrClosed or ErrConnectionLost. It is safe to call Close more
// than once and from several goroutines.
func (p *Publisher) Close() error {
	p.once.Do(func() {
		p.mu.Lock()
		p.closed = true
		p.closedFlag.Store(true)
		s := p.sess
		p.mu.Unlock()
		if s != nil {
			deadline := time.Now().Add(p.cfg.CloseTimeout)
			// Once a write in progress is over, no new one starts: writers
			// check p.closed while holding the send lock.
			select {
			case s.sendLock <- struct{}{}:
				<-s.sendLock
			case <-s.dead:
			case <-time.After(p.cfg.CloseTimeout):
			}
			s.waitIdle(time.Until(deadline))
		}
		close(p.closing)
		if s != nil {
			s.fail(fmt.Errorf("%w: the publisher was closed before the broker confirmed", ErrConnectionLost), false)
			_ = s.conn.CloseDeadline(time.Now().Add(2 * time.Second))
		}
		p.wg.Wait()
		if s != nil {
			p.log.Info("publisher closed the broker connection", "url", p.url)
		}
	})
	return nil
}

func (p *Publisher) isClosed() bool { return p.closedFlag.Load() }

// want asks the background loop to keep a connection up.
func (p *Publisher) want() {
	p.mu.Lock()
	already := p.wanted
	p.wanted = true
	p.mu.Unlock()
	if !already {
		p.poke()
	}
}

func (p *Publisher) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// notWrittenAfterBreak says why a message of a call was not sent on the
// next connection.
const notWrittenAfterBreak = "not written: the connection broke after earlier messages of the call were written"

// await waits for pd to be resolved or ctx to end. It returns false when
// the caller gave up: the outcome is then the dispatcher's to report.
func (p *Publisher) await(ctx context.Context, pd *pending) bool {
	select {
	case <-pd.done:
		return true
	case <-ctx.Done():
		select {
		case <-pd.done:
			return true
		default:
			if pd.owner.CompareAndSwap(ownerNone, ownerDispatcher) {
				pd.abandoned = true
				return false
			}
			<-pd.done
			return true
		}
	}
}

// enqueue waits for a connection, the exchange and a window slot, then
// queues pub for the session's writer and returns its pending confirm and
// the session. With pinned set it only queues on that session: a call's
// messages never continue on a new connection after earlier ones went on a
// connection that broke, so they reach the wire in order.
func (p *Publisher) enqueue(ctx context.Context, pinned *session, exchange, key string, pub amqp.Publishing) (*pending, *session, error) {
	// The timer exists only while there is no connection: the common
	// path takes no timer, and every channel operation on it tries the
	// uncontended non-blocking form first (the window and the session's
	// dead channel are shared by every publishing goroutine).
	var connTimer *time.Timer
	defer func() {
		if connTimer != nil {
			connTimer.Stop()
		}
	}()
	for {
		if pinned != nil && pinned.isDead() {
			return nil, nil, fmt.Errorf("%s: %w", notWrittenAfterBreak, pinned.deadErr)
		}
		s := p.liveSession()
		if s == nil {
			if connTimer == nil {
				connTimer = time.NewTimer(p.cfg.ConfirmTimeout)
			}
			var err error
			if s, err = p.session(ctx, connTimer.C); err != nil {
				return nil, nil, err
			}
		}
		if err := s.ensureExchange(ctx, exchange); err != nil {
			if errors.Is(err, errSessionDead) {
				continue
			}
			return nil, nil, err
		}
		// A window slot.
		select {
		case p.window <- struct{}{}:
		default:
			select {
			case p.window <- struct{}{}:
			case <-s.dead:
				continue
			case <-ctx.Done():
				return nil, nil, fmt.Errorf("waiting for a slot in the confirm window: %w", context.Cause(ctx))
			case <-p.closing:
				return nil, nil, ErrClosed
			}
		}
		pd := &pending{
			msgID:    pub.MessageId,
			exchange: exchange,
			key:      key,
			pub:      pub,
			done:     make(chan struct{}),
		}
		if !s.register(pd) {
			<-p.window
			continue // the session died since we looked
		}
		return pd, s, nil
	}
}

// writeLoop is the session's only writer of publishes: it writes them in
// the order register queued them, so each gets the delivery tag register
// gave it, and the deep amqp091 write path runs on one goroutine whose
// stack has grown once, not on every caller's.
func (s *session) writeLoop() {
	defer s.p.wg.Done()
	for {
		select {
		case pd := <-s.writes:
			s.write(pd)
		case <-s.dead:
			return // fail resolved every registered publish, queued ones too
		}
	}
}

func (s *session) write(pd *pending) {
	pd.written.Store(true) // before the check of dead: see fail
	select {
	case s.sendLock <- struct{}{}:
	default:
		select {
		case s.sendLock <- struct{}{}:
		case <-s.dead:
			return
		}
	}
	defer func() { <-s.sendLock }()
	if s.isDead() {
		return
	}
	if s.p.closedFlag.Load() {
		// Close waits for the write in progress; nothing is written after.
		s.mu.Lock()
		_, ok := s.pending[pd.tag]
		if ok {
			s.forget(pd)
		}
		s.mu.Unlock()
		if ok {
			pd.unsent = true
			s.resolve(pd, fmt.Errorf("publish message %s to exchange %q: %w", pd.msgID, pd.exchange, ErrClosed))
		}
		return
	}
	if tag := s.ch.GetNextPublishSeqNo(); tag != pd.tag {
		s.fail(fmt.Errorf("%w: delivery tag %d is out of step with the channel's %d", ErrConnectionLost, pd.tag, tag), true)
		return
	}
	pub := pd.pub
	pd.pub = amqp.Publishing{}
	if err := s.ch.Publish(pd.exchange, pd.key, true, false, pub); err != nil {
		s.fail(fmt.Errorf("%w: write to the channel failed: %v", ErrConnectionLost, err), true)
		return
	}
	s.p.published.Add(1)
}

// liveSession returns the live session, or nil when there is none now.
func (p *Publisher) liveSession() *session {
	p.mu.Lock()
	s, closed := p.sess, p.closed
	p.mu.Unlock()
	if closed || s == nil || s.isDead() {
		return nil
	}
	return s
}

// session returns the live session, waiting for one until ctx ends, timeout
// fires or the publisher closes.
func (p *Publisher) session(ctx context.Context, timeout <-chan time.Time) (*session, error) {
	for {
		p.mu.Lock()
		s, ready, closed := p.sess, p.ready, p.closed
		p.mu.Unlock()
		if closed {
			return nil, ErrClosed
		}
		if s != nil && !s.isDead() {
			return s, nil
		}
		p.poke()
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for a connection to %s: %w", p.url, context.Cause(ctx))
		case <-timeout:
			p.mu.Lock()
			last := p.lastErr
			p.mu.Unlock()
			if last != nil {
				return nil, fmt.Errorf("%w: no connection to the broker within %s: %w", ErrConnectionLost, p.cfg.ConfirmTimeout, last)
			}
			return nil, fmt.Errorf("%w: no connection to %s within %s", ErrConnectionLost, p.url, p.cfg.ConfirmTimeout)
		case <-p.closing:
			return nil, ErrClosed
		}
	}
}

// run keeps a connection up once one is wanted, reconnecting with
// exponential backoff, until Close.
func (p *Publisher) run() {
	defer p.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-p.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	bo := &backoff.ExponentialBackOff{
		InitialInterval:     p.cfg.ReconnectMin,
		RandomizationFactor: 0.5,
		Multiplier:          2,
		MaxInterval:         p.cfg.ReconnectMax,
	}
	bo.Reset()
	var failingSince, lastLog time.Time
	for {
		p.mu.Lock()
		s, wanted := p.sess, p.wanted
		p.mu.Unlock()
		if s != nil {
			select {
			case <-s.dead:
				p.lost(s)
				continue
			case <-p.closing:
				return
			}
		}
		if !wanted {
			select {
			case <-p.wake:
				continue
			case <-p.closing:
				return
			}
		}
		err := p.connect(ctx)
		if err == nil {
			bo.Reset()
			failingSince = time.Time{}
			continue
		}
		if ctx.Err() != nil {
			return
		}
		now := time.Now()
		if failingSince.IsZero() {
			failingSince, lastLog = now, now
			p.log.Warn("cannot connect to the broker, retrying with backoff", "url", p.url, "error", err)
		} else if now.Sub(lastLog) >= time.Minute {
			lastLog = now
			p.log.Warn("still cannot connect to the broker, retrying", "url", p.url, "for", now.Sub(failingSince).Round(time.Second), "error", err)
		}
		t := time.NewTimer(bo.NextBackOff())
		select {
		case <-t.C:
		case <-p.closing:
			t.Stop()
			return
		}
	}
}

// lost forgets the dead session s and logs the loss once.
func (p *Publisher) lost(s *session) {
	p.mu.Lock()
	if p.sess != s {
		p.mu.Unlock()
		return
	}
	p.sess = nil
	p.lostSince = time.Now()
	closed := p.closed
	p.mu.Unlock()
	if !closed {
		p.log.Warn("connection to the broker lost, reconnecting", "url", p.url, "error", s.deadErr)
	}
}

// connect dials and installs a new session unless one is up.
func (p *Publisher) connect(ctx context.Context) error {
	select {
	case p.dialLock <- struct{}{}:
		defer func() { <-p.dialLock }()
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-p.closing:
		return ErrClosed
	}
	p.mu.Lock()
	cur, closed := p.sess, p.closed
	p.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if cur != nil && !cur.isDead() {
		return nil
	}
	s, err := p.open(ctx)
	if err != nil {
		p.mu.Lock()
		p.lastErr = err
		p.mu.Unlock()
		return err
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		s.fail(ErrClosed, false)
		_ = s.conn.CloseDeadline(time.Now().Add(time.Second))
		return ErrClosed
	}
	p.sess = s
	p.lastErr = nil
	close(p.ready)
	p.ready = make(chan struct{})
	again, down := p.everUp, time.Since(p.lostSince)
	p.everUp = true
	p.mu.Unlock()
	p.connects.Add(1)
	if again {
		p.log.Info("reconnected to the broker", "url", p.url, "after", down.Round(time.Millisecond))
	} else {
		p.log.Info("connected to the broker", "url", p.url)
	}
	return nil
}

// open dials and sets up the confirm-mode channel and its dispatcher.
func (p *Publisher) open(ctx context.Context) (*session, error) {
	conn, err := Dial(ctx, p.cfg.Connection)
	if err != nil {
		return nil, err
	}
	ch, err := conn.Channel()
	if err != nil {
		_ = conn.CloseDeadline(time.Now().Add(time.Second))
		return nil, fmt.Errorf("open a channel on %s: %w", p.url, err)
	}
	s := &session{
		p:         p,
		conn:      conn,
		ch:        ch,
		sendLock:  make(chan struct{}, 1),
		writes:    make(chan *pending, p.cfg.Window),
		next:      1,
		pending:   make(map[uint64]*pending),
		byID:      make(map[string][]*pending),
		oldest:    1,
		dead:      make(chan struct{}),
		exchanges: make(map[string]*exchangeState),
		unblocked: time.Now(),
		// Returns and confirms are drained by one goroutine. amqp091
		// delivers both from the connection's reader goroutine in wire
		// order, and RabbitMQ sends a message's basic.return before its
		// basic.ack, so a return is in its buffer before the confirm of the
		// same publish is in its own: the dispatcher takes every buffered
		// return before each confirm. The buffers let the reader hand over
		// a multiple ack's confirms without waiting for the dispatcher to
		// be scheduled for each one.
		returns:   ch.NotifyReturn(make(chan amqp.Return, 64)),
		confirms:  ch.NotifyPublish(make(chan amqp.Confirmation, p.cfg.Window)),
		chClose:   ch.NotifyClose(make(chan *amqp.Error, 1)),
		connClose: conn.NotifyClose(make(chan *amqp.Error, 1)),
		blocks:    conn.NotifyBlocked(make(chan amqp.Blocking, 4)),
	}
	if err := ch.Confirm(false); err != nil {
		_ = conn.CloseDeadline(time.Now().Add(time.Second))
		return nil, fmt.Errorf("put the channel in confirm mode on %s: %w", p.url, err)
	}
	p.wg.Add(2)
	go s.dispatch()
	go s.writeLoop()
	return s, nil
}

// pending is one publish awaiting its confirm.
type pending struct {
	tag      uint64
	msgID    string
	exchange string
	key      string
	sentAt   time.Time
	clock    time.Duration   // the session's unblocked clock at send
	pub      amqp.Publishing // until the writer takes it

	// written is set by the writer before it writes (or finds the session
	// dead); unsent is set, before done is closed, on a publish that was
	// resolved without being written.
	written atomic.Bool
	unsent  bool
	// abandoned is set by the caller that gave up waiting.
	abandoned bool

	// Set by the dispatcher before done is closed.
	returned   bool
	returnText string
	err        error
	doneAt     time.Time
	done       chan struct{}

	owner atomic.Int32 // who reports the outcome to the hooks
}

const (
	ownerNone       = iota // the caller, who waits
	ownerCaller            // resolved while the caller waited
	ownerDispatcher        // the caller gave up: the dispatcher reports
)

// errSessionDead makes publishOne retry on the next connection.
var errSessionDead = errors.New("session dead")

// session is one connection with its confirm-mode channel.
type session struct {
	p    *Publisher
	conn *amqp.Connection
	ch   *amqp.Channel

	sendLock chan struct{}
	writes   chan *pending // registered publishes, in tag order, for writeLoop

	returns   <-chan amqp.Return
	confirms  <-chan amqp.Confirmation
	chClose   <-chan *amqp.Error
	connClose <-chan *amqp.Error
	blocks    <-chan amqp.Blocking

	mu        sync.Mutex
	pending   map[uint64]*pending
	byID      map[string][]*pending // unreturned publishes by message id, in tag order
	oldest    uint64                // the lowest tag that may be pending
	next      uint64                // one past the highest tag registered
	blocked   bool
	reason    string
	active    time.Duration // unblocked time accumulated before unblocked
	unblocked time.Time     // when the connection was last unblocked
	dead      chan struct{}
	deadErr   error

	exMu      sync.Mutex
	exchanges map[string]*exchangeState
}

type exchangeState struct {
	done chan struct{}
	err  error
	// ok is set once the exchange is known to exist: the publish path
	// then takes no channel operation for it.
	ok atomic.Bool
}

func (s *session) isDead() bool {
	select {
	case <-s.dead:
		return true
	default:
		return false
	}
}

// clock is the time the connection spent unblocked; call with s.mu held.
func (s *session) clock() time.Duration {
	if s.blocked {
		return s.active
	}
	return s.active + time.Since(s.unblocked)
}

// register gives pd its delivery tag, records it and queues it for the
// writer; false if the session is dead.
func (s *session) register(pd *pending) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.isDead() {
		return false
	}
	pd.tag = s.next
	pd.sentAt = time.Now()
	pd.clock = s.clock()
	s.pending[pd.tag] = pd
	s.byID[pd.msgID] = append(s.byID[pd.msgID], pd)
	if len(s.pending) == 1 {
		s.oldest = pd.tag
	}
	s.next = pd.tag + 1
	// Never blocks: every queued publish holds one of the Window slots.
	s.writes <- pd
	if n := int64(len(s.pending)); n > s.p.maxOutstanding.Load() {
		for {
			cur := s.p.maxOutstanding.Load()
			if n <= cur || s.p.maxOutstanding.CompareAndSwap(cur, n) {
				break
			}
		}
	}
	return true
}

// forget removes pd from the indexes; call with s.mu held.
func (s *session) forget(pd *pending) {
	delete(s.pending, pd.tag)
	if list := s.byID[pd.msgID]; len(list) > 0 {
		for i, q := range list {
			if q == pd {
				list = append(list[:i:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(s.byID, pd.msgID)
		} else {
			s.byID[pd.msgID] = list
		}
	}
	for s.oldest < s.next && s.pending[s.oldest] == nil {
		s.oldest++
	}
}

// resolve completes pd with err (nil: acked) and frees its window slot.
func (s *session) resolve(pd *pending, err error) {
	pd.err = err
	pd.doneAt = time.Now()
	<-s.p.window
	close(pd.done)
	if !pd.owner.CompareAndSwap(ownerNone, ownerCaller) {
		s.p.reportAbandoned(pd)
	}
}

// reportAbandoned calls the hooks for a publish whose caller stopped
// waiting, off the dispatcher goroutine.
func (p *Publisher) reportAbandoned(pd *pending) {
	if (pd.err != nil && !pd.returned) || (p.cfg.OnConfirmed == nil && p.cfg.OnUnroutable == nil) {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		if pd.returned {
			if p.cfg.OnUnroutable != nil {
				p.cfg.OnUnroutable(pd.exchange, pd.key, pd.msgID)
			}
		} else if p.cfg.OnConfirmed != nil {
			p.cfg.OnConfirmed(pd.exchange, 1, pd.doneAt.Sub(pd.sentAt))
		}
	}()
}

// fail breaks the session once: every outstanding publish fails with err
// and, if closeConn, the connection is closed in the background.
func (s *session) fail(err error, closeConn bool) {
	s.mu.Lock()
	if s.isDead() {
		s.mu.Unlock()
		return
	}
	s.deadErr = err
	close(s.dead)
	outstanding := make([]*pending, 0, len(s.pending))
	for _, pd := range s.pending {
		outstanding = append(outstanding, pd)
	}
	s.pending = map[uint64]*pending{}
	s.byID = map[string][]*pending{}
	s.mu.Unlock()

	for _, pd := range outstanding {
		pd.unsent = !pd.written.Load()
		s.p.failed.Add(1)
		s.resolve(pd, fmt.Errorf("publish message %s to exchange %q: %w", pd.msgID, pd.exchange, err))
	}
	if closeConn {
		s.p.wg.Add(1)
		go func() {
			defer s.p.wg.Done()
			_ = s.conn.CloseDeadline(time.Now().Add(time.Second))
		}()
	}
	s.p.poke()
}

// waitIdle waits until nothing awaits a confirm, the session dies or d
// passes.
func (s *session) waitIdle(d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		n := len(s.pending)
		s.mu.Unlock()
		if n == 0 || s.isDead() {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// dispatch is the session's only reader of returns, confirms, blocked
// notices and close notices. It must never block for long: amqp091 gives
// up a notification it cannot deliver within 5 seconds.
func (s *session) dispatch() {
	defer s.p.wg.Done()
	every := min(max(s.p.cfg.ConfirmTimeout/10, 10*time.Millisecond), time.Second)
	tick := time.NewTicker(every)
	defer tick.Stop()
	returns, confirms, blocks := s.returns, s.confirms, s.blocks
	takeReturn := func(r amqp.Return, ok bool) {
		if !ok {
			returns = nil
			s.fail(s.lostError("the channel closed"), true)
			return
		}
		s.onReturn(r)
	}
	for returns != nil || confirms != nil {
		select {
		case r, ok := <-returns:
			takeReturn(r, ok)
		case c, ok := <-confirms:
			if !ok {
				confirms = nil
				s.fail(s.lostError("the channel closed"), true)
				continue
			}
			// Returns that came before this confirm on the wire.
		drain:
			for returns != nil {
				select {
				case r, ok := <-returns:
					takeReturn(r, ok)
				default:
					break drain
				}
			}
			s.onConfirm(c)
		case b, ok := <-blocks:
			if !ok {
				blocks = nil
				continue
			}
			s.onBlocked(b)
		case <-tick.C:
			s.checkOverdue()
		}
	}
}

// lostError builds the ErrConnectionLost error with the broker's reason
// when a close notice carries one.
func (s *session) lostError(fallback string) error {
	for _, c := range []<-chan *amqp.Error{s.connClose, s.chClose} {
		select {
		case e, ok := <-c:
			if ok && e != nil {
				return fmt.Errorf("%w: %s", ErrConnectionLost, describeAMQPError(e))
			}
		default:
		}
	}
	return fmt.Errorf("%w: %s", ErrConnectionLost, fallback)
}

func (s *session) onReturn(r amqp.Return) {
	s.mu.Lock()
	var match *pending
	// Returns come in publish order, each before the confirm of its
	// publish: the oldest unreturned outstanding publish with that id,
	// exchange and routing key is the one.
	for _, pd := range s.byID[r.MessageId] {
		if !pd.returned && pd.exchange == r.Exchange && pd.key == r.RoutingKey {
			match = pd
			break
		}
	}
	if match != nil {
		match.returned = true
		match.returnText = r.ReplyText
	}
	s.mu.Unlock()
	if match == nil {
		s.p.log.Warn("broker returned a message that matches no outstanding publish",
			"exchange", r.Exchange, "routing_key", r.RoutingKey, "message_id", r.MessageId, "reason", r.ReplyText)
	}
}

func (s *session) onConfirm(c amqp.Confirmation) {
	s.mu.Lock()
	pd := s.pending[c.DeliveryTag]
	if pd != nil {
		s.forget(pd)
	}
	s.mu.Unlock()
	if pd == nil {
		return // failed already
	}
	p := s.p
	switch {
	case !c.Ack:
		p.nacked.Add(1)
		s.resolve(pd, fmt.Errorf("publish message %s to exchange %q: %w: the broker could not take it (publish it again)", pd.msgID, pd.exchange, ErrNacked))
	case pd.returned:
		p.returned.Add(1)
		p.logUnroutable(pd)
		var err error
		if p.cfg.Unroutable == UnroutableKeep {
			err = &UnroutableError{MessageID: pd.msgID, Exchange: pd.exchange, RoutingKey: pd.key, Reason: pd.returnText}
		}
		s.resolve(pd, err)
	default:
		p.confirmed.Add(1)
		s.resolve(pd, nil)
	}
}

func (s *session) onBlocked(b amqp.Blocking) {
	s.mu.Lock()
	was := s.blocked
	switch {
	case b.Active && !was:
		s.active += time.Since(s.unblocked)
		s.blocked, s.reason = true, b.Reason
	case !b.Active && was:
		s.unblocked = time.Now()
		s.blocked = false
	}
	s.mu.Unlock()
	switch {
	case b.Active && !was:
		s.p.log.Warn(fmt.Sprintf("broker blocked the connection: %s, waiting", b.Reason), "url", s.p.url)
	case !b.Active && was:
		s.p.log.Info("broker unblocked the connection", "url", s.p.url)
	}
}

// checkOverdue breaks the session when the oldest publish has waited for
// its confirm longer than ConfirmTimeout of unblocked time.
func (s *session) checkOverdue() {
	s.mu.Lock()
	pd := s.pending[s.oldest]
	var late time.Duration
	if pd != nil && !s.blocked {
		late = s.clock() - pd.clock
	}
	s.mu.Unlock()
	if late > s.p.cfg.ConfirmTimeout {
		s.fail(fmt.Errorf("%w: no confirm from the broker within %s (delivery tag %d), closing the connection", ErrConnectionLost, s.p.cfg.ConfirmTimeout, pd.tag), true)
	}
}

// ensureExchange declares (or checks) exchange once per connection.
func (s *session) ensureExchange(ctx context.Context, exchange string) error {
	if exchange == "" {
		return nil
	}
	s.exMu.Lock()
	st := s.exchanges[exchange]
	if st != nil && st.ok.Load() {
		s.exMu.Unlock()
		return nil
	}
	if st == nil {
		st = &exchangeState{done: make(chan struct{})}
		s.exchanges[exchange] = st
		s.p.wg.Add(1)
		go func() {
			defer s.p.wg.Done()
			var err error
			if s.p.cfg.NoDeclare || strings.HasPrefix(exchange, "amq.") {
				err = verifyExchangeExists(context.Background(), s.conn, exchange)
			} else {
				err = declareExchange(context.Background(), s.conn, exchange)
			}
			if err != nil {
				s.exMu.Lock()
				delete(s.exchanges, exchange) // the next publish tries again
				s.exMu.Unlock()
			}
			st.err = err
			st.ok.Store(err == nil)
			close(st.done)
		}()
	}
	s.exMu.Unlock()
	select {
	case <-st.done:
		if st.err != nil && s.isDead() {
			return errSessionDead
		}
		return st.err
	case <-s.dead:
		return errSessionDead
	case <-ctx.Done():
		return fmt.Errorf("waiting for exchange %q to be declared: %w", exchange, context.Cause(ctx))
	}
}

// UnroutableError is a message the broker returned as unroutable; it wraps
// ErrUnroutable.
type UnroutableError struct {
	MessageID, Exchange, RoutingKey string
	Reason                          string // the broker's reply text, e.g. NO_ROUTE
}

// Error names the message, the exchange and the routing key.
func (e *UnroutableError) Error() string {
	return fmt.Sprintf("message %s to exchange %q with routing key %q is unroutable (%s): no queue is bound for it, so the broker dropped it; it is kept to be published again",
		e.MessageID, e.Exchange, e.RoutingKey, e.Reason)
}

// Unwrap returns ErrUnroutable.
func (e *UnroutableError) Unwrap() error { return ErrUnroutable }

// logUnroutable logs a returned message, at most once per
// UnroutableLogInterval, with the count of those not logged.
func (p *Publisher) logUnroutable(pd *pending) {
	l := &p.unroutableLog
	l.Lock()
	now := time.Now()
	if !l.last.IsZero() && now.Sub(l.last) < p.cfg.UnroutableLogInterval {
		l.suppressed++
		l.Unlock()
		return
	}
	suppressed := l.suppressed
	l.last, l.suppressed = now, 0
	l.Unlock()
	p.log.Warn("broker returned an unroutable message: no queue is bound for its routing key",
		"exchange", pd.exchange, "routing_key", pd.key, "message_id", pd.msgID,
		"policy", p.cfg.Unroutable.String(), "not_logged_since_last", suppressed)
}

// maxShortstr is the longest AMQP short string: names, the routing key,
// most properties and header names.
const maxShortstr = 255

// checkPublishing refuses what the broker or amqp091 would answer by
// closing the channel or the connection, which would fail every other
// outstanding publish too.
func checkPublishing(key string, pub amqp.Publishing) error {
	for _, f := range []struct{ name, value string }{
		{"routing key", key},
		{"message_id", pub.MessageId},
		{"type", pub.Type},
		{"app_id", pub.AppId},
		{"content_type", pub.ContentType},
		{"content_encoding", pub.ContentEncoding},
		{"correlation_id", pub.CorrelationId},
		{"reply_to", pub.ReplyTo},
		{"expiration", pub.Expiration},
		{"user_id", pub.UserId},
	} {
		if len(f.value) > maxShortstr {
			return fmt.Errorf("%s is %d bytes long, AMQP allows at most %d", f.name, len(f.value), maxShortstr)
		}
	}
	for k := range pub.Headers {
		if len(k) > maxShortstr {
			return fmt.Errorf("header name %q... is %d bytes long, AMQP allows at most %d", k[:32], len(k), maxShortstr)
		}
	}
	if e := pub.Expiration; e != "" {
		if _, err := strconv.ParseUint(e, 10, 32); err != nil {
			return fmt.Errorf("expiration %q is not a number of milliseconds", e)
		}
	}
	if err := pub.Headers.Validate(); err != nil {
		return fmt.Errorf("headers: %w", err)
	}
	return nil
}
