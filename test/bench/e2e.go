package main

import (
	"bufio"
	"context"
	"database/sql"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

// quantiles of a latency distribution.
type quantiles struct{ P50, P95, P99, Max time.Duration }

// quantilesOf returns the nearest-rank quantiles of ds (sorted in place).
func quantilesOf(ds []time.Duration) quantiles {
	if len(ds) == 0 {
		return quantiles{}
	}
	slices.Sort(ds)
	at := func(p float64) time.Duration {
		i := int(p*float64(len(ds))+0.999999) - 1
		return ds[min(max(i, 0), len(ds)-1)]
	}
	return quantiles{P50: at(0.50), P95: at(0.95), P99: at(0.99), Max: ds[len(ds)-1]}
}

func (q quantiles) String() string {
	return fmt.Sprintf("p50 %s, p95 %s, p99 %s, max %s ms", ms(q.P50), ms(q.P95), ms(q.P99), ms(q.Max))
}

// e2eResult is figure 4.
type e2eResult struct {
	N         int
	Achieved  float64   // events/s the application committed
	Commit    quantiles // the application's own append-and-commit time
	Delivered quantiles // commit → arrival at a raw consumer of a second queue
	Published quantiles // commit → published_at (the relay's mark)
	Inbox     quantiles // commit → the inbox transaction committed
	// Confirm is the relay's publish → confirm, estimated from its
	// warren_relay_confirm_seconds histogram (Max: the upper bound of the
	// highest bucket used).
	Confirm quantiles
	CPU     cpuUse
}

// endToEnd is figure 4: an application appends one event per transaction
// at perSec events/s for d while `warren relay` (its own process) and a
// consumer (in this process, defaults) run; each event's commit time is
// compared with its published_at and with the moment the consumer's inbox
// transaction holding it committed.
func (b *bench) endToEnd(ctx context.Context, perSec int, d time.Duration) (e2eResult, error) {
	var res e2eResult
	producer, err := b.producer(ctx)
	if err != nil {
		return res, err
	}
	k := b.seq.Add(1)
	app, appPath, err := b.newDB(ctx, fmt.Sprintf("e2e-app-%d", k))
	if err != nil {
		return res, err
	}
	defer removeDB(appPath)
	defer app.Close()

	// The consumer's own database, stamping inbox commits.
	cdb, cPath, err := b.newDB(ctx, fmt.Sprintf("e2e-consumer-%d", k))
	if err != nil {
		return res, err
	}
	_ = cdb.Close()
	defer removeDB(cPath)
	var (
		mu      sync.Mutex
		pending []string
		inboxAt = map[string]time.Time{}
		handled atomic.Int64
	)
	cdb, err = openStamped(ctx, cPath, func() {
		now := time.Now()
		mu.Lock()
		for _, id := range pending {
			if _, ok := inboxAt[id]; !ok {
				inboxAt[id] = now
			}
		}
		pending = pending[:0]
		mu.Unlock()
	})
	if err != nil {
		return res, err
	}
	defer cdb.Close()
	cfg := b.consumerConfig(b.name(fmt.Sprintf("e2e%d", k)), producer, cdb)
	defer b.deleteConsumerQueues(cfg)()
	c, err := consumer.New(cfg, consumer.HandlerFunc(func(_ context.Context, _ *sql.Tx, d *consumer.Delivery) error {
		mu.Lock()
		pending = append(pending, d.MessageID)
		mu.Unlock()
		handled.Add(1)
		return nil
	}))
	if err != nil {
		return res, err
	}
	if err := c.Start(ctx); err != nil {
		return res, err
	}
	defer func() { _ = c.Stop(context.Background()) }()

	// A raw consumer on a second quorum queue says when each event left
	// the relay: published_at is stamped when the relay marks the row,
	// which may be later than the broker's confirm.
	stopTap, err := b.tap(ctx, producer, b.name(fmt.Sprintf("tap-%d", k)))
	if err != nil {
		return res, err
	}
	defer stopTap()

	metricsAddr, err := freeAddr()
	if err != nil {
		return res, err
	}
	p, err := b.startWarren([]string{"WARREN_DB=" + appPath, "WARREN_URL=" + b.o.url, "WARREN_LOG_LEVEL=info", "WARREN_METRICS_ADDR=" + metricsAddr}, "relay")
	if err != nil {
		return res, err
	}
	defer p.kill()
	if _, err := p.waitStarted(ctx, 30*time.Second); err != nil {
		return res, err
	}

	// Warm up the path (connections, the first exchange declare) with 100
	// events that do not count.
	const warm = 100
	warmEvs := make([]outbox.Event, warm)
	for i := range warmEvs {
		warmEvs[i] = event(producer, i)
	}
	if _, err := outbox.AppendDB(ctx, app, warmEvs...); err != nil {
		return res, err
	}
	if err := waitCount(ctx, &handled, warm, 30*time.Second); err != nil {
		return res, fmt.Errorf("warm-up: %w\nrelay output:\n%s", err, p.output())
	}

	b.settle(ctx, "4 end to end")
	// The relay's own publish → confirm histogram, from here on.
	confirmsBefore, err := scrapeHistogram(ctx, metricsAddr, "warren_relay_confirm_seconds")
	if err != nil {
		return res, err
	}
	n := perSec * int(d/time.Second)
	var appended atomic.Int64
	bar := newBar(n, "4 end to end: appending")
	stopBar := follow(bar, &appended)
	m := b.meter(p.cmd.Process.Pid)
	ap, err := appendSteady(ctx, app, producer, warm, n, perSec, &appended)
	stopBar()
	if err != nil {
		return res, err
	}
	ids, committed, commitTook := ap.ids, ap.committed, ap.took
	res.N = n
	res.Achieved = ap.achieved
	if err := waitCount(ctx, &handled, warm+n, time.Minute); err != nil {
		return res, fmt.Errorf("%w\nrelay output:\n%s", err, p.output())
	}
	res.CPU = m.stop()
	confirmsAfter, err := scrapeHistogram(ctx, metricsAddr, "warren_relay_confirm_seconds")
	if err != nil {
		return res, err
	}
	res.Confirm = confirmsAfter.minus(confirmsBefore).quantiles()

	// Every row is marked published shortly after its confirm.
	if _, err := waitDrained(ctx, app, 1, n, newBar(n, "4 waiting for the last marks"), p.done, 30*time.Second); err != nil {
		return res, err
	}
	published, err := publishedAt(ctx, app)
	if err != nil {
		return res, err
	}
	arrived := stopTap()
	toPub := make([]time.Duration, 0, n)
	toInbox := make([]time.Duration, 0, n)
	toTap := make([]time.Duration, 0, n)
	mu.Lock()
	for i, id := range ids {
		at, ok := arrived[id]
		if !ok {
			mu.Unlock()
			return res, fmt.Errorf("event %s never reached the raw consumer", id)
		}
		toTap = append(toTap, at.Sub(committed[i]))
		pt, ok := published[id]
		if !ok {
			mu.Unlock()
			return res, fmt.Errorf("event %s has no published_at", id)
		}
		it, ok := inboxAt[id]
		if !ok {
			mu.Unlock()
			return res, fmt.Errorf("event %s never reached the inbox", id)
		}
		// published_at is truncated to the millisecond: count the middle
		// of its millisecond.
		toPub = append(toPub, max(pt.Add(time.Millisecond/2).Sub(committed[i]), 0))
		toInbox = append(toInbox, it.Sub(committed[i]))
	}
	mu.Unlock()
	if b.o.verbose {
		for j := 0; j < len(toPub); j += perSec / 4 {
			fmt.Fprintf(os.Stderr, "  end to end, appended at %5.2fs: delivered %s ms published_at %s ms inbox %s ms\n", committed[j].Sub(ap.start).Seconds(), ms(toTap[j]), ms(toPub[j]), ms(toInbox[j]))
		}
	}
	res.Commit = quantilesOf(commitTook)
	res.Delivered = quantilesOf(toTap)
	res.Published = quantilesOf(toPub)
	res.Inbox = quantilesOf(toInbox)
	b.logf("figure 4: %d events at %.0f/s (asked %d/s); application commit %s; commit → delivered %s; commit → published_at %s; commit → inbox %s; the relay's publish → confirm (its histogram) %s (%s)",
		n, res.Achieved, perSec, res.Commit, res.Delivered, res.Published, res.Inbox, res.Confirm, res.CPU)
	if err := p.stop(30 * time.Second); err != nil {
		return res, fmt.Errorf("stop relay: %w\n%s", err, p.output())
	}
	return res, nil
}

// waitCount waits until counter reaches n.
func waitCount(ctx context.Context, counter *atomic.Int64, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for counter.Load() < int64(n) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d events reached the consumer within %s", counter.Load(), n, timeout)
		}
		select {
		case <-time.After(10 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// publishedAt returns every row's published_at by event id.
func publishedAt(ctx context.Context, db *sql.DB) (map[string]time.Time, error) {
	rows, err := db.QueryContext(ctx, `SELECT event_id, published_at FROM warren_outbox WHERE published_at IS NOT NULL`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]time.Time{}
	for rows.Next() {
		var id, at string
		if err := rows.Scan(&id, &at); err != nil {
			return nil, err
		}
		t, err := wsql.ParseTime(at)
		if err != nil {
			return nil, err
		}
		out[id] = t
	}
	return out, rows.Err()
}

// tap consumes a second quorum queue bound to the producer's exchange with
// auto-ack and records when each message id first arrived. The returned
// func stops it (once) and returns the arrivals.
func (b *bench) tap(ctx context.Context, producer, queue string) (func() map[string]time.Time, error) {
	del, err := b.quorumQueue(queue, publisher.ExchangeName(producer))
	if err != nil {
		return nil, err
	}
	conn, err := rawDial(b.o.url)
	if err != nil {
		del()
		return nil, err
	}
	ch, err := conn.Channel()
	if err == nil {
		err = ch.Qos(1000, 0, false)
	}
	var ds <-chan amqp.Delivery
	if err == nil {
		ds, err = ch.Consume(queue, "tap", true, false, false, false, nil)
	}
	if err != nil {
		_ = conn.Close()
		del()
		return nil, fmt.Errorf("tap %s: %w", queue, err)
	}
	arrived := map[string]time.Time{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for d := range ds {
			if _, ok := arrived[d.MessageId]; !ok {
				arrived[d.MessageId] = time.Now()
			}
		}
	}()
	var once sync.Once
	return func() map[string]time.Time {
		once.Do(func() {
			_ = conn.Close()
			<-done
			del()
		})
		return arrived
	}, nil
}

// floorResult is figure 4's floor: the broker alone at the same rate.
type floorResult struct {
	N         int
	Confirmed quantiles // publish → its confirm
	Delivered quantiles // publish → arrival at a raw consumer
	AppCommit quantiles // the application's commits meanwhile
	CPU       cpuUse
}

// brokerFloor publishes perSec of the relay's messages per second for d
// with raw amqp091-go (a confirm-mode channel, many publishes in flight)
// to a fresh exchange bound to two quorum queues, as in the end-to-end
// phase (the consumer's queue and the tap), while raw consumers read both
// (one manual-ack channel with the consumer's prefetch, one auto-ack as
// the tap), and while the application of the end-to-end phase appends at
// the same rate to an outbox that no relay reads: the broker shares the
// disk with its commits, as it does end to end. It measures what the
// broker adds at that rate on this machine: publish → confirm and publish
// → delivered. Nothing of warren runs; the end-to-end figures cannot be
// lower.
func (b *bench) brokerFloor(ctx context.Context, perSec int, d time.Duration) (floorResult, error) {
	var res floorResult
	k := b.seq.Add(1)
	producer, err := b.producer(ctx)
	if err != nil {
		return res, err
	}
	app, appPath, err := b.newDB(ctx, fmt.Sprintf("floor-app-%d", k))
	if err != nil {
		return res, err
	}
	defer removeDB(appPath)
	defer app.Close()
	exchange := b.name(fmt.Sprintf("floor-%d.events", k))
	if err := b.exchange(exchange); err != nil {
		return res, err
	}
	n := perSec * int(d/time.Second)
	msgs, err := warrenPublishings(producer, n)
	if err != nil {
		return res, err
	}
	ids := make(map[string]int, n)
	for i := range msgs {
		msgs[i].MessageId = fmt.Sprintf("floor-%d", i)
		ids[msgs[i].MessageId] = i
	}
	sent := make([]time.Time, n)
	confirmedAt := make([]time.Time, n)
	arrived := make([]time.Time, n)

	conn, err := rawDial(b.o.url)
	if err != nil {
		return res, err
	}
	defer conn.Close()
	var arrivals atomic.Int64
	for i, q := range []string{b.name(fmt.Sprintf("floor-%d-consumer", k)), b.name(fmt.Sprintf("floor-%d-tap", k))} {
		del, err := b.quorumQueue(q, exchange)
		if err != nil {
			return res, err
		}
		defer del()
		ch, err := conn.Channel()
		if err != nil {
			return res, err
		}
		manual := i == 0
		prefetch := 1000
		if manual {
			prefetch = consumer.DefaultConcurrency * 2
		}
		if err := ch.Qos(prefetch, 0, false); err != nil {
			return res, err
		}
		ds, err := ch.Consume(q, "", !manual, false, false, false, nil)
		if err != nil {
			return res, fmt.Errorf("consume %s: %w", q, err)
		}
		go func() {
			for dl := range ds {
				if manual {
					now := time.Now()
					if j, ok := ids[dl.MessageId]; ok && arrived[j].IsZero() {
						arrived[j] = now
						arrivals.Add(1)
					}
					_ = dl.Ack(false)
				}
			}
		}()
	}

	pch, err := conn.Channel()
	if err != nil {
		return res, err
	}
	if err := pch.Confirm(false); err != nil {
		return res, err
	}
	confirms := pch.NotifyPublish(make(chan amqp.Confirmation, window))
	var confirmedN atomic.Int64
	confirmDone := make(chan struct{})
	go func() {
		defer close(confirmDone)
		for c := range confirms {
			if c.DeliveryTag >= 1 && int(c.DeliveryTag) <= n {
				confirmedAt[c.DeliveryTag-1] = time.Now()
			}
			if confirmedN.Add(1) == int64(n) {
				return
			}
		}
	}()
	b.settle(ctx, "4 the broker alone")
	bar := newBar(n, "4 the broker alone")
	stopBar := follow(bar, &arrivals)
	m := b.meter(0)
	appDone := make(chan error, 1)
	var appCount atomic.Int64
	var ap appended
	go func() {
		var err error
		ap, err = appendSteady(ctx, app, producer, 0, n, perSec, &appCount)
		appDone <- err
	}()
	interval := time.Second / time.Duration(perSec)
	start := time.Now()
	for i := range msgs {
		if wait := time.Until(start.Add(time.Duration(i) * interval)); wait > 0 {
			time.Sleep(wait)
		}
		sent[i] = time.Now()
		if err := pch.PublishWithContext(ctx, exchange, eventType, true, false, msgs[i]); err != nil {
			stopBar()
			return res, fmt.Errorf("publish: %w", err)
		}
	}
	err = waitCount(ctx, &arrivals, n, time.Minute)
	stopBar()
	res.CPU = m.stop()
	if aerr := <-appDone; err == nil && aerr != nil {
		err = fmt.Errorf("the application: %w", aerr)
	}
	if err != nil {
		return res, err
	}
	select {
	case <-confirmDone:
	case <-time.After(30 * time.Second):
		return res, fmt.Errorf("%d of %d confirms arrived", confirmedN.Load(), n)
	}
	toConfirm := make([]time.Duration, n)
	toArrive := make([]time.Duration, n)
	for i := range n {
		toConfirm[i] = confirmedAt[i].Sub(sent[i])
		toArrive[i] = arrived[i].Sub(sent[i])
	}
	res.N = n
	res.Confirmed = quantilesOf(toConfirm)
	res.Delivered = quantilesOf(toArrive)
	res.AppCommit = quantilesOf(ap.took)
	b.logf("figure 4, the broker alone: %d messages at %d/s; publish → confirm %s; publish → delivered %s; the application's commits meanwhile %s (%s)", n, perSec, res.Confirmed, res.Delivered, res.AppCommit, res.CPU)
	return res, nil
}

// appended is what appendSteady did.
type appended struct {
	start     time.Time
	ids       []string        // event ids, in schedule order
	committed []time.Time     // when each commit returned
	took      []time.Duration // how long each append-and-commit took
	achieved  float64         // events/s
}

// appendSteady is the application of figure 4: appenders (as a service's
// concurrent requests would) each take the next of n events on a fixed
// schedule of perSec per second and append it to db's outbox in a
// transaction of its own; with one appender, a commit slower than the
// interval would lower the rate asked for. Event i is event(producer,
// first+i). count counts the commits.
//
// The application writes through one connection, as a SQLite application
// with concurrent writers should: database/sql queues them in order, where
// SQLite's busy handler would let one of them wait seconds while the
// others take the lock.
func appendSteady(ctx context.Context, db *sql.DB, producer string, first, n, perSec int, count *atomic.Int64) (appended, error) {
	const appenders = 4
	db.SetMaxOpenConns(1)
	a := appended{ids: make([]string, n), committed: make([]time.Time, n), took: make([]time.Duration, n)}
	interval := time.Second / time.Duration(perSec)
	a.start = time.Now()
	var next atomic.Int64
	errs := make(chan error, appenders)
	var wg sync.WaitGroup
	for range appenders {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if wait := time.Until(a.start.Add(time.Duration(i) * interval)); wait > 0 {
					time.Sleep(wait)
				}
				t0 := time.Now()
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					errs <- err
					return
				}
				got, err := outbox.Append(ctx, tx, event(producer, first+i))
				if err != nil {
					_ = tx.Rollback()
					errs <- err
					return
				}
				if err := tx.Commit(); err != nil {
					errs <- err
					return
				}
				a.committed[i] = time.Now()
				a.took[i] = a.committed[i].Sub(t0)
				a.ids[i] = got[0]
				count.Add(1)
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return a, err
	}
	a.achieved = float64(n) / slices.MaxFunc(a.committed, func(x, y time.Time) int { return x.Compare(y) }).Sub(a.start).Seconds()
	return a, nil
}

// freeAddr returns a loopback address with a port free a moment ago.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// histogram is a Prometheus histogram as scraped: cumulative counts by
// upper bound, in increasing order.
type histogram struct {
	bounds []float64 // seconds; the last is +Inf
	counts []float64
}

// scrapeHistogram reads the histogram name from the /metrics page at addr.
func scrapeHistogram(ctx context.Context, addr, name string) (histogram, error) {
	var h histogram
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return h, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return h, fmt.Errorf("scrape the relay's metrics: %w", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	prefix := name + `_bucket{le="`
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, prefix)
		if !ok {
			continue
		}
		le, value, ok := strings.Cut(rest, `"} `)
		if !ok {
			return h, fmt.Errorf("metrics: cannot read %q", line)
		}
		bound, err := strconv.ParseFloat(le, 64)
		if err != nil {
			return h, fmt.Errorf("metrics: %q: %w", line, err)
		}
		count, err := strconv.ParseFloat(strings.Fields(value)[0], 64)
		if err != nil {
			return h, fmt.Errorf("metrics: %q: %w", line, err)
		}
		h.bounds = append(h.bounds, bound)
		h.counts = append(h.counts, count)
	}
	if err := sc.Err(); err != nil {
		return h, err
	}
	if len(h.bounds) == 0 {
		return h, fmt.Errorf("metrics: no %s histogram on http://%s/metrics", name, addr)
	}
	return h, nil
}

// minus is h with the counts of an earlier scrape taken away.
func (h histogram) minus(earlier histogram) histogram {
	out := histogram{bounds: h.bounds, counts: slices.Clone(h.counts)}
	if len(earlier.counts) == len(h.counts) {
		for i := range out.counts {
			out.counts[i] -= earlier.counts[i]
		}
	}
	return out
}

// quantiles estimates p50, p95 and p99 as Prometheus' histogram_quantile
// does: linear within the bucket the rank falls in. Max is the upper bound
// of the highest bucket that counted anything.
func (h histogram) quantiles() quantiles {
	total := h.counts[len(h.counts)-1]
	if total == 0 {
		return quantiles{}
	}
	at := func(q float64) time.Duration {
		rank := q * total
		lower, below := 0.0, 0.0
		for i, c := range h.counts {
			if c >= rank {
				upper := h.bounds[i]
				if math.IsInf(upper, 1) {
					upper = lower // beyond the last bound: say the last bound
				}
				frac := 0.0
				if c > below {
					frac = (rank - below) / (c - below)
				}
				return time.Duration((lower + frac*(upper-lower)) * float64(time.Second))
			}
			lower, below = h.bounds[i], c
		}
		return time.Duration(lower * float64(time.Second))
	}
	q := quantiles{P50: at(0.50), P95: at(0.95), P99: at(0.99)}
	for i := range h.counts {
		if i == 0 || h.counts[i] > h.counts[i-1] {
			q.Max = time.Duration(h.bounds[i] * float64(time.Second))
			if math.IsInf(h.bounds[i], 1) {
				q.Max = time.Duration(h.bounds[i-1] * float64(time.Second))
			}
		}
	}
	return q
}
