package relay

import (
	"context"
	"database/sql"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
)

// subscriber is a Watermill message.Subscriber over warren_outbox. It emits
// rows in seq order with at most one row per aggregate in flight, up to
// Window rows in all; a published row is handed to the marker, a failed one
// is read again and re-emitted after a backoff, ahead of the later rows of
// its aggregate, which wait.
//
// Each Watermill message it emits is a batch: the rows ready at that moment,
// at most PublishBatch, all of one producer, each of another aggregate. The
// relay's handler publishes the batch's rows in one call and tells the
// subscriber the outcome of each row (report) as it returns to the router,
// which then acks or nacks the message: the facts the message's Acked and
// Nacked channels carry, row by row, without a goroutine per message
// waiting on them. A failed row is retried alone; its batch's other rows
// are marked.
type subscriber struct {
	cfg     Config
	db      *sql.DB
	wake    <-chan struct{}
	marks   *marker
	msgCtx  context.Context
	log     *slog.Logger
	stopped chan struct{}
	results chan result
}

var _ message.Subscriber = (*subscriber)(nil)

// pending is a row the subscriber holds: read, waiting, in flight or
// waiting for a retry.
type pending struct {
	row      outbox.Row
	key      string
	attempts int
	lastErr  string
}

// batch is what one emitted message carries: rows to publish, all to one
// exchange.
type batch struct {
	exchange string
	rows     []*pending
}

type batchKey struct{}

// batchOf returns the batch an emitted message carries.
func batchOf(msg *message.Message) *batch {
	b, _ := msg.Context().Value(batchKey{}).(*batch)
	return b
}

type result struct {
	msg  *message.Message
	errs []error // one per row of its batch; nil: published
}

// report tells the subscriber that the handler is done with msg, which it
// emitted, and how each of its rows fared (errs[i] is nil for a published
// row; errs has one entry per row, which publishRows ensures). It never
// blocks: at most Window messages are in flight and results holds as many.
func (s *subscriber) report(msg *message.Message, errs []error) {
	s.results <- result{msg: msg, errs: errs}
}

// Subscribe starts emitting. The channel closes after ctx is done and every
// emitted message was acked or nacked.
func (s *subscriber) Subscribe(ctx context.Context, _ string) (<-chan *message.Message, error) {
	out := make(chan *message.Message)
	go s.run(ctx, out)
	return out, nil
}

// Close does nothing: the relay stops the subscriber through the context.
func (s *subscriber) Close() error { return nil }

func (s *subscriber) run(ctx context.Context, out chan<- *message.Message) {
	defer close(s.stopped)
	defer close(out)

	readerCtx, stopReader := context.WithCancel(ctx)
	defer stopReader()
	batches := make(chan []outbox.Row, 1)
	var readerDone sync.WaitGroup
	readerDone.Add(1)
	go func() { defer readerDone.Done(); s.reader(readerCtx, batches) }()
	defer readerDone.Wait()

	var (
		ready    []*pending // may be emitted now, in seq order
		waiting  = map[string][]*pending{}
		busy     = map[string]bool{}
		inflight int
		held     int // rows held in memory: ready, waiting, in flight, retrying
		heldSize int
		draining bool
		results  = s.results
		flying   = make(map[*message.Message]*batch, s.cfg.Window)
		retries  = make(chan *pending)
		quit     = make(chan struct{})
		next     *message.Message
		nextB    *batch
	)
	defer close(quit)

	release := func(p *pending) {
		held--
		heldSize -= p.row.Size()
		if w := waiting[p.key]; len(w) > 0 {
			ready = append(ready, w[0])
			if len(w) == 1 {
				delete(waiting, p.key)
			} else {
				waiting[p.key] = w[1:]
			}
			return
		}
		delete(busy, p.key)
	}
	retryLater := func(p *pending) {
		p.attempts++
		d := s.cfg.RetryMin << min(p.attempts-1, 16)
		if d > s.cfg.RetryMax || d <= 0 {
			d = s.cfg.RetryMax
		}
		time.AfterFunc(d, func() {
			select {
			case retries <- p:
			case <-quit:
			}
		})
	}
	accept := func(p *pending) {
		if p.row.Err != nil {
			p.lastErr = p.row.Err.Error()
			s.log.Error("outbox row cannot be published; fix or delete it, later events of its aggregate wait",
				"seq", p.row.Seq, "event_id", p.row.EventID, "err", p.row.Err, "retry_in", s.cfg.RetryMin<<min(p.attempts, 16))
			retryLater(p)
			return
		}
		ready = append(ready, p)
	}

	for {
		if draining && inflight == 0 {
			return
		}
		var sendCh chan<- *message.Message
		if !draining && inflight < s.cfg.Window && (next != nil || len(ready) > 0) {
			if next == nil {
				next, nextB = s.nextBatch(&ready, s.cfg.Window-inflight)
			}
			sendCh = out
		}
		var batchCh <-chan []outbox.Row
		if !draining && held < s.cfg.MaxBufferedRows && heldSize < s.cfg.MaxBufferBytes {
			batchCh = batches
		}
		var done <-chan struct{}
		if !draining {
			done = ctx.Done()
		}

		select {
		case sendCh <- next:
			inflight += len(nextB.rows)
			flying[next] = nextB
			next, nextB = nil, nil

		case batch := <-batchCh:
			for i := range batch {
				p := &pending{row: batch[i], key: batch[i].AggregateKey()}
				held++
				heldSize += p.row.Size()
				if busy[p.key] {
					waiting[p.key] = append(waiting[p.key], p)
					continue
				}
				busy[p.key] = true
				accept(p)
			}

		case r := <-results:
			b, ok := flying[r.msg]
			if !ok {
				s.log.Error("relay: outcome reported for a message the subscriber did not emit", "uuid", r.msg.UUID)
				continue
			}
			delete(flying, r.msg)
			inflight -= len(b.rows)
			var seqs []int64
			for i, p := range b.rows {
				if r.errs[i] == nil {
					seqs = append(seqs, p.row.Seq)
				}
			}
			s.marks.add(seqs...)
			for i, p := range b.rows {
				switch {
				case r.errs[i] == nil:
					release(p)
				case draining:
					release(p) // stays unpublished; the next run publishes it
				default:
					s.log.Debug("publish failed; will retry", "seq", p.row.Seq, "event_id", p.row.EventID, "attempt", p.attempts+1, "err", r.errs[i])
					retryLater(p)
				}
			}

		case p := <-retries:
			if draining {
				release(p)
				continue
			}
			// Read the row again: an operator may have fixed or deleted it.
			row, ok, err := outbox.Get(ctx, s.db, p.row.Seq, s.cfg.MaxPayloadBytes)
			switch {
			case err != nil:
				s.log.Warn("re-read outbox row failed; will retry", "seq", p.row.Seq, "err", err)
				retryLater(p)
			case !ok || row.PublishedAt != nil:
				release(p)
			default:
				heldSize += row.Size() - p.row.Size()
				p.row = row
				accept(p)
			}

		case <-done:
			draining = true
			stopReader()
			if next != nil { // built but never sent
				for _, p := range nextB.rows {
					release(p)
				}
				next, nextB = nil, nil
			}
			s.log.Info("relay stopping: waiting for outstanding confirms", "in_flight", inflight)
		}
	}
}

// nextBatch takes the rows for the next message off the front of ready: at
// most PublishBatch and room, and only those of the first row's producer
// (one call publishes to one exchange). The others keep their order.
func (s *subscriber) nextBatch(ready *[]*pending, room int) (*message.Message, *batch) {
	r := *ready
	n := min(len(r), room, s.cfg.PublishBatch)
	producer := r[0].row.Producer
	k := 1
	for k < n && r[k].row.Producer == producer {
		k++
	}
	b := &batch{
		exchange: publisher.ExchangeName(producer),
		rows:     make([]*pending, k),
	}
	copy(b.rows, r[:k])
	clear(r[:k])
	*ready = r[k:]
	uuid := b.rows[0].row.EventID
	if k > 1 {
		uuid = "outbox-seq-" + strconv.FormatInt(b.rows[0].row.Seq, 10) + "+" + strconv.Itoa(k)
	}
	msg := message.NewMessage(uuid, nil)
	msg.SetContext(context.WithValue(s.msgCtx, batchKey{}, b))
	return msg, b
}

// recheck is when the reader looks again after a change notification that
// showed nothing new: inotify reports the write of the WAL file, which
// comes before the commit is visible to readers (SQLite updates the
// shared-memory index after the write and, under synchronous=FULL, after
// an fsync, which takes tens of milliseconds on a busy disk). No file event
// marks the moment it becomes visible, so the reader looks again every few
// milliseconds for a while and then less often; the checks stop once the
// file is quiet: nothing polls.
var recheck = []time.Duration{
	2 * time.Millisecond, 2 * time.Millisecond, 2 * time.Millisecond, 2 * time.Millisecond, 2 * time.Millisecond, // to 10 ms
	5 * time.Millisecond, 5 * time.Millisecond, 5 * time.Millisecond, 5 * time.Millisecond, // to 30 ms
	15 * time.Millisecond, 50 * time.Millisecond, 150 * time.Millisecond, 250 * time.Millisecond, // to 0.5 s
}

// readGap is the least time between the starts of two reads that a change
// notification asks for. A read after another connection's commit costs
// more than the commit itself (SQLite drops the reader's page cache and
// reads the pages again): an application committing every millisecond
// would have the relay read once per commit, and a notification for each
// WAL write, often before the commit is visible. Waiting until readGap has
// passed gathers a few commits per read, at the cost of at most readGap of
// latency; a backlog is read in full batches without waiting.
const readGap = 2 * time.Millisecond

// reader reads unpublished rows after a cursor and hands them over in
// batches, waking on every change notification.
func (s *subscriber) reader(ctx context.Context, batches chan<- []outbox.Row) {
	var cursor int64
	errDelay := s.cfg.RetryMin
	step := 0
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		lastRead := time.Now()
		rows, err := outbox.ReadUnpublished(ctx, s.db, cursor, s.cfg.BatchSize, s.cfg.MaxPayloadBytes)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			s.log.Warn("read outbox failed; will retry", "err", err, "retry_in", errDelay)
			select {
			case <-time.After(errDelay):
			case <-ctx.Done():
				return
			}
			errDelay = min(errDelay*2, s.cfg.RetryMax)
			continue
		}
		errDelay = s.cfg.RetryMin
		if len(rows) > 0 {
			cursor = rows[len(rows)-1].Seq
			select {
			case batches <- rows:
			case <-ctx.Done():
				return
			}
			if len(rows) == s.cfg.BatchSize {
				continue
			}
			step = 0
		}
		var recheckC <-chan time.Time
		if step < len(recheck) {
			timer.Reset(recheck[step])
			recheckC = timer.C
			step++
		}
		woken := false
		select {
		case <-s.wake:
			woken = true
			step = 0
		case <-recheckC:
		case <-ctx.Done():
			return
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		if gap := readGap - time.Since(lastRead); woken && gap > 0 {
			timer.Reset(gap)
			select {
			case <-timer.C:
			case <-ctx.Done():
				return
			}
		}
	}
}

// marker marks confirmed rows published in short batched transactions.
// It takes confirmed seqs at once, whatever the database does (add never
// waits: while the application keeps SQLite's write lock busy a mark can
// wait seconds for it, and publishing must not wait with it), and writes
// whatever gathered while the previous write ran, at most every
// markInterval, so a steady stream costs the application few lock
// acquisitions.
type marker struct {
	db   *sql.DB
	log  *slog.Logger
	done chan struct{}
	// ctx aborts retries of a failing write (hard stop only).
	ctx    context.Context
	onMark func(n int)

	mu      sync.Mutex
	pending []int64
	closed  bool
	wake    chan struct{}
}

// markInterval is the shortest time between two mark transactions. After
// a mark of at least backlogMark rows, the sign of a backlog being
// drained, the marker lets the next one gather for up to
// backlogMarkInterval, as long as confirms keep coming: a mark transaction
// has a fixed cost (the pages its first and last rows share with the
// previous and next mark, the index pages, the commit), and while a
// backlog drains the rows waited far longer than that for their turn. A
// stream of 1,000 events/s (marks of about 10 rows) keeps the short
// interval, and published_at stays within milliseconds of the confirm;
// the end of a drain is marked within markInterval of its last confirm.
const (
	markInterval        = 10 * time.Millisecond
	backlogMark         = 128
	backlogMarkInterval = 40 * time.Millisecond
)

// gather waits for the next mark to gather after a mark of n rows:
// markInterval, and after a large mark up to backlogMarkInterval, in steps
// of markInterval while rows keep arriving.
func (m *marker) gather(n int) {
	time.Sleep(markInterval)
	if n < backlogMark {
		return
	}
	prev, closed := m.pendingLen()
	for waited := markInterval; waited < backlogMarkInterval && !closed; waited += markInterval {
		time.Sleep(markInterval)
		var cur int
		if cur, closed = m.pendingLen(); cur == prev {
			return // the confirms stopped: mark what came now
		}
		prev = cur
	}
}

// pendingLen returns how many rows wait to be marked, and whether the
// marker is closed.
func (m *marker) pendingLen() (int, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.pending), m.closed
}

func newMarker(ctx context.Context, db *sql.DB, log *slog.Logger, onMark func(int)) *marker {
	return &marker{db: db, log: log, done: make(chan struct{}), ctx: ctx, onMark: onMark, wake: make(chan struct{}, 1)}
}

// add queues confirmed rows to be marked. It never blocks.
func (m *marker) add(seqs ...int64) {
	if len(seqs) == 0 {
		return
	}
	m.mu.Lock()
	m.pending = append(m.pending, seqs...)
	m.mu.Unlock()
	m.poke()
}

// close makes run write what is pending and return.
func (m *marker) close() {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.poke()
}

func (m *marker) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *marker) run() {
	defer close(m.done)
	const maxBatch = 2000
	for range m.wake {
		for {
			m.mu.Lock()
			batch, closed := m.pending, m.closed
			m.pending = nil
			m.mu.Unlock()
			if len(batch) == 0 {
				if closed {
					return
				}
				break
			}
			for i := 0; i < len(batch); i += maxBatch {
				m.flush(batch[i:min(i+maxBatch, len(batch))])
			}
			if !closed {
				// Let the next batch gather.
				m.gather(len(batch))
			}
		}
	}
}

func (m *marker) flush(seqs []int64) {
	delay := 50 * time.Millisecond
	for {
		err := outbox.MarkPublished(m.ctx, m.db, seqs, time.Now())
		if err == nil {
			if m.onMark != nil {
				m.onMark(len(seqs))
			}
			return
		}
		if m.ctx.Err() != nil {
			m.log.Warn("relay aborted before marking confirmed rows; they will be published again", "rows", len(seqs))
			return
		}
		m.log.Warn("marking rows published failed; will retry", "rows", len(seqs), "first_seq", strconv.FormatInt(seqs[0], 10), "err", err)
		select {
		case <-time.After(delay):
		case <-m.ctx.Done():
		}
		delay = min(delay*2, 5*time.Second)
	}
}
