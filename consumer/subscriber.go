package consumer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/cenkalti/backoff/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/warrenmq/warren/publisher"
)

// subscriber is the consumer's message.Subscriber. It reads the consumer's
// queue on one AMQP channel with the consumer's prefetch, hands at most
// Concurrency deliveries at a time to the Router, and acks them as their
// handlers finish, in delivery order: a run of finished deliveries is one
// multiple ack.
//
// It replaces watermill-amqp's subscriber, which keeps one delivery in
// flight per subscription (the consumer needed a channel per unit of
// concurrency, each with a prefetch of 2) and acks each delivery with a
// frame of its own: about a third of the consumer's and the broker's work
// per delivery.
//
// When the connection or the channel is lost, or the broker cancels the
// subscription (the queue was deleted), it reconnects with backoff and
// declares (or verifies) the topology again; the deliveries that were in
// flight go back to the queue and come again redelivered, which the inbox
// recognises. Close stops taking deliveries, waits until the ones handed
// out are acked or nacked, then closes the connection; abort closes it at
// once (the unacked deliveries go back to the queue).
type subscriber struct {
	conn     publisher.ConnectionConfig
	queue    string
	prefetch int
	// slots holds one token per delivery handed to the Router and not yet
	// settled (acked or nacked, see handout): its capacity is the
	// concurrency.
	slots    chan struct{}
	topology func(context.Context, *amqp.Connection) error
	log      *slog.Logger
	url      string // redacted

	mu      sync.Mutex
	current *amqp.Connection // set while connected

	subscribed atomic.Bool
	// stopped is cancelled by Close: take no more deliveries, and give up
	// a connect in progress.
	stopped  context.Context
	stop     context.CancelFunc
	kill     chan struct{} // closed by abort: cut the connection now
	killOnce sync.Once
	done     chan struct{} // closed when the subscription has ended
}

var _ message.Subscriber = (*subscriber)(nil)

// Settling of delivered messages.
const (
	// heldAckDelay is how long a finished delivery waits for the ones
	// delivered before it to finish, so that they are acked together,
	// before it is acked on its own.
	heldAckDelay = time.Millisecond
	// connRetryLogInterval is the least time between two lines saying the
	// subscription still cannot reconnect.
	connRetryLogInterval = time.Minute
)

func newSubscriber(cfg Config, topology func(context.Context, *amqp.Connection) error, log *slog.Logger) *subscriber {
	stopped, stop := context.WithCancel(context.Background())
	return &subscriber{
		stopped:  stopped,
		stop:     stop,
		conn:     cfg.Connection,
		queue:    publisher.QueueName(cfg.Consumer),
		prefetch: cfg.Prefetch,
		slots:    make(chan struct{}, cfg.Concurrency),
		topology: topology,
		log:      log,
		url:      publisher.RedactURL(cfg.Connection.URL),
		kill:     make(chan struct{}),
		done:     make(chan struct{}),
	}
}

// connect dials the broker and declares (or verifies) the topology. The
// consumer calls it once before the Router runs, for a clear error at
// start; the subscription then uses that connection.
func (s *subscriber) connect(ctx context.Context) (*amqp.Connection, error) {
	conn, err := publisher.Dial(ctx, s.conn)
	if err != nil {
		return nil, err
	}
	if err := s.topology(ctx, conn); err != nil {
		_ = conn.Close()
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.kill:
		_ = conn.Close()
		return nil, errors.New("consumer subscription aborted")
	default:
	}
	s.current = conn
	return conn, nil
}

// Subscribe starts reading the queue; topic is ignored (the consumer has
// one queue). A subscriber subscribes once. The returned channel is closed
// when the subscription ends: after Close, or when ctx is done.
func (s *subscriber) Subscribe(ctx context.Context, _ string) (<-chan *message.Message, error) {
	if !s.subscribed.CompareAndSwap(false, true) {
		return nil, errors.New("consumer subscription: subscribed already, or closed")
	}
	out := make(chan *message.Message)
	context.AfterFunc(ctx, func() { _ = s.Close() })
	go s.run(ctx, out)
	return out, nil
}

// Close stops taking deliveries, waits until the deliveries handed out
// are acked or nacked (and the acks sent), and closes the connection. It
// is safe to call more than once.
func (s *subscriber) Close() error {
	s.stop()
	if s.subscribed.CompareAndSwap(false, true) {
		// Never subscribed: close the connection of connect, if any.
		s.closeConn()
		close(s.done)
		return nil
	}
	<-s.done
	return nil
}

// abort cuts the connection at once and ends the subscription: the
// deliveries in flight are not acked and go back to the queue.
func (s *subscriber) abort() {
	s.stop()
	s.killOnce.Do(func() { close(s.kill) })
	s.closeConn()
	_ = s.Close()
}

// IsConnected reports whether the subscription has a live connection.
func (s *subscriber) IsConnected() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.current != nil && !s.current.IsClosed()
}

func (s *subscriber) closeConn() {
	s.mu.Lock()
	conn := s.current
	s.current = nil
	s.mu.Unlock()
	if conn != nil {
		_ = conn.Close()
	}
}

func (s *subscriber) stopping() bool { return s.stopped.Err() != nil }

// run consumes until the subscription is closed, reconnecting when the
// connection, the channel or the broker's consumer is lost.
func (s *subscriber) run(ctx context.Context, out chan<- *message.Message) {
	defer close(s.done)
	defer close(out)
	defer s.closeConn()
	bo := &backoff.ExponentialBackOff{
		InitialInterval:     publisher.DefaultReconnectMin,
		RandomizationFactor: 0.5,
		Multiplier:          2,
		MaxInterval:         publisher.DefaultReconnectMax,
	}
	bo.Reset()
	var lostSince, retryLogged time.Time
	for !s.stopping() {
		s.mu.Lock()
		conn := s.current
		s.mu.Unlock()
		if conn == nil || conn.IsClosed() {
			dialCtx, cancel := context.WithTimeout(s.stopped, topologyTimeout)
			var err error
			conn, err = s.connect(dialCtx)
			cancel()
			if err != nil {
				if s.stopping() {
					return
				}
				now := time.Now()
				if lostSince.IsZero() {
					lostSince = now
				}
				switch {
				case retryLogged.IsZero():
					s.log.Warn("subscription cannot reconnect to the broker, retrying with backoff", "url", s.url, "error", err)
					retryLogged = now
				case now.Sub(retryLogged) >= connRetryLogInterval:
					s.log.Warn("subscription still cannot reconnect to the broker, retrying", "url", s.url,
						"for", now.Sub(lostSince).Round(time.Second), "error", err)
					retryLogged = now
				}
				select {
				case <-time.After(bo.NextBackOff()):
				case <-s.stopped.Done():
					return
				}
				continue
			}
		}
		bo.Reset()
		err := s.consume(ctx, conn, out, func() {
			if !lostSince.IsZero() {
				s.log.Info("subscription reconnected to the broker; deliveries resume", "url", s.url,
					"after", time.Since(lostSince).Round(time.Millisecond))
				lostSince, retryLogged = time.Time{}, time.Time{}
			}
		})
		s.closeConn()
		if s.stopping() {
			return
		}
		if !lostSince.IsZero() {
			continue // lost again before it was back: said already
		}
		lostSince, retryLogged = time.Now(), time.Time{}
		if errors.Is(err, errCancelled) {
			s.log.Warn("the broker cancelled the subscription (was the queue deleted?); subscribing again", "queue", s.queue)
		} else {
			s.log.Warn("subscription lost its connection to the broker, reconnecting", "url", s.url, "error", err)
		}
	}
}

// errCancelled: the broker cancelled the consumer (the queue was deleted).
var errCancelled = errors.New("the broker cancelled the consumer")

// consume reads the queue on a channel of conn until the subscription is
// closed (it then lets the deliveries in flight finish and returns nil) or
// the channel or its consumer ends (it returns why).
func (s *subscriber) consume(ctx context.Context, conn *amqp.Connection, out chan<- *message.Message, up func()) error {
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open a channel: %w", err)
	}
	if err := ch.Qos(s.prefetch, 0, false); err != nil {
		return fmt.Errorf("set the prefetch to %d: %w", s.prefetch, err)
	}
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	cancelled := ch.NotifyCancel(make(chan string, 1))
	const tag = "warren"
	deliveries, err := ch.Consume(s.queue, tag, false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume %s: %w", s.queue, err)
	}
	up()
	a := newAcker(ch, s.log)
	go a.loop()
	ended := func() error {
		a.end()
		select {
		case <-cancelled:
			return errCancelled
		default:
		}
		select {
		case e := <-closed:
			if e != nil {
				return e
			}
		default:
		}
		return errors.New("the channel closed")
	}
	for {
		var d amqp.Delivery
		var ok bool
		select {
		case d, ok = <-deliveries:
			if !ok {
				return ended()
			}
		case <-s.stopped.Done():
			s.finish(ch, tag, a)
			return nil
		}
		a.add(d.DeliveryTag)
		select {
		case s.slots <- struct{}{}:
		case <-s.stopped.Done():
			a.settle(d.DeliveryTag, false)
			s.finish(ch, tag, a)
			return nil
		}
		if d.Acknowledger == nil && d.DeliveryTag == 0 {
			// The zero delivery (publisher.ErrNoDelivery) is not one.
			<-s.slots
			a.settle(d.DeliveryTag, false)
			continue
		}
		// The consumer reads the delivery itself (parse): the message
		// carries its id and body for the Router, and no metadata.
		msg := message.NewMessage(d.MessageId, d.Body)
		h := &handout{tag: d.DeliveryTag, a: a, slots: s.slots, raw: &d}
		msg.SetContext(context.WithValue(ctx, handoutKey{}, h))
		select {
		case out <- msg:
		case <-s.stopped.Done():
			h.settle(false)
			s.finish(ch, tag, a)
			return nil
		}
	}
}

// handout is a delivery handed to the Router. It is settled once, by the
// consumer's handler as it returns (settle) or earlier, by the committer
// (settleEarly) as soon as the outcome is certain, and then frees its
// slot.
type handout struct {
	raw   *amqp.Delivery
	tag   uint64
	a     *acker
	slots chan struct{}
	done  atomic.Bool
}

type handoutKey struct{}

// settle acks (ok) or nacks the delivery and frees its slot, once.
func (h *handout) settle(ok bool) {
	if h.done.CompareAndSwap(false, true) {
		h.a.settle(h.tag, ok)
		<-h.slots
	}
}

// settleEarly acks msg's delivery now, before its handler returns to the
// Router: the inbox transaction that holds it committed, and the Router
// will ack it. The committer calls it right after the commit, for every
// delivery of the batch at once, so that their acks go out as one frame
// and the next deliveries come while the handler goroutines unwind.
func settleEarly(msg *message.Message) { settle(msg, true) }

// settle acks (ok) or nacks (with requeue) msg's delivery, unless it was
// settled before.
func settle(msg *message.Message, ok bool) {
	if h, found := msg.Context().Value(handoutKey{}).(*handout); found {
		h.settle(ok)
	}
}

// finish ends a clean stop: the broker stops delivering, the deliveries
// handed out finish and are settled, then the channel closes (which
// returns the deliveries that were sent ahead to the queue).
func (s *subscriber) finish(ch *amqp.Channel, tag string, a *acker) {
	_ = ch.Cancel(tag, false)
	// Wait for the deliveries in flight: take every slot.
	for range cap(s.slots) {
		select {
		case s.slots <- struct{}{}:
		case <-s.kill:
			a.end()
			return
		}
	}
	for range cap(s.slots) {
		<-s.slots
	}
	a.end()
	a.flush(true)
	_ = ch.Close()
}

// Settlement states of a delivery.
type settlement uint8

const (
	pending settlement = iota // handed out, not finished
	acked                     // to ack
	nacked                    // to nack (requeue)
	sent                      // acked or nacked on its own already
)

// acker settles one channel's deliveries. Deliveries finish in any order;
// the acker acks the finished ones at the front (oldest first) with one
// multiple ack up to the last of them, nacks (with requeue) the nacked
// ones on their own, and acks a finished delivery that waits behind an
// unfinished one on its own after heldAckDelay, so that a slow handler
// does not hold the others' acks (and the prefetch) back.
type acker struct {
	ch  settler
	log *slog.Logger

	mu    sync.Mutex
	first uint64       // delivery tag of states[0]
	state []settlement // from the oldest unsettled delivery on

	wake  chan struct{}
	quit  chan struct{}
	ended sync.Once
	done  chan struct{}
}

// settler is the part of *amqp.Channel the acker uses.
type settler interface {
	Ack(tag uint64, multiple bool) error
	Nack(tag uint64, multiple, requeue bool) error
}

func newAcker(ch settler, log *slog.Logger) *acker {
	return &acker{ch: ch, log: log, wake: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
}

// add records a delivery; tags come in order.
func (a *acker) add(tag uint64) {
	a.mu.Lock()
	if len(a.state) == 0 {
		a.first = tag
	}
	a.state = append(a.state, pending)
	a.mu.Unlock()
}

// settle marks a delivery to ack (ok) or to nack.
func (a *acker) settle(tag uint64, ok bool) {
	a.mu.Lock()
	if i := tag - a.first; tag >= a.first && i < uint64(len(a.state)) && a.state[i] == pending {
		if ok {
			a.state[i] = acked
		} else {
			a.state[i] = nacked
		}
	}
	a.mu.Unlock()
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// end stops the loop; a flush after it is the caller's.
func (a *acker) end() {
	a.ended.Do(func() { close(a.quit) })
	<-a.done
}

func (a *acker) loop() {
	defer close(a.done)
	held := time.NewTimer(time.Hour)
	held.Stop()
	armed := false
	for {
		all := false
		select {
		case <-a.wake:
		case <-held.C:
			armed, all = false, true
		case <-a.quit:
			held.Stop()
			return
		}
		if a.flush(all) && !armed {
			held.Reset(heldAckDelay)
			armed = true
		}
	}
}

// frame is one ack or nack to send.
type frame struct {
	tag      uint64
	ack      bool
	multiple bool
}

// flush sends the acks and nacks that are due, and reports whether
// finished deliveries wait behind an unfinished one. With all, those are
// settled on their own now.
func (a *acker) flush(all bool) (held bool) {
	var frames []frame
	a.mu.Lock()
	var run uint64 // the last of a run of acks at the front
	n := 0
	for n < len(a.state) && a.state[n] != pending {
		tag := a.first + uint64(n)
		switch a.state[n] {
		case acked:
			run = tag
		case nacked:
			if run != 0 {
				frames = append(frames, frame{tag: run, ack: true, multiple: true})
				run = 0
			}
			frames = append(frames, frame{tag: tag})
		}
		n++
	}
	if run != 0 {
		frames = append(frames, frame{tag: run, ack: true, multiple: true})
	}
	a.state = a.state[n:]
	a.first += uint64(n)
	for i, st := range a.state {
		if st != acked && st != nacked {
			continue
		}
		if !all {
			held = true
			break
		}
		frames = append(frames, frame{tag: a.first + uint64(i), ack: st == acked})
		a.state[i] = sent
	}
	// Sent in order under the lock: a multiple ack must not overtake the
	// nack of a delivery before it.
	for _, f := range frames {
		var err error
		if f.ack {
			err = a.ch.Ack(f.tag, f.multiple)
		} else {
			err = a.ch.Nack(f.tag, false, true)
		}
		if err != nil {
			// The channel is gone: the broker returns every unacked
			// delivery to the queue.
			a.log.Debug("cannot settle deliveries: the channel is closed", "error", err)
			break
		}
	}
	a.mu.Unlock()
	return held
}
