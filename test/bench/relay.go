package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"slices"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/relay"
	wsql "github.com/warrenmq/warren/sql"
)

// rate is a count of messages moved in a time.
type rate struct {
	N    int
	Took time.Duration
	CPU  cpuUse
}

func (r rate) PerSec() float64 {
	if r.Took <= 0 {
		return 0
	}
	return float64(r.N) / r.Took.Seconds()
}

// drain is one relay drain of a backlog.
type drain struct {
	rate
	HWMKiB int // the relay process's peak resident memory (VmHWM)
	// First and Last are the rates over rows 10-20% and 80-90%.
	First, Last float64
}

// producer is the run's producing application; its exchange is
// "<producer>.events", declared once.
func (b *bench) producer(ctx context.Context) (string, error) {
	p := "bench-" + b.id
	b.mu.Lock()
	declared := b.declared
	b.declared = true
	b.mu.Unlock()
	if !declared {
		if err := b.exchange(publisher.ExchangeName(p)); err != nil {
			return "", err
		}
	}
	return p, nil
}

// limit is figure 1: raw amqp091-go publishing n of the relay's messages
// with a window of 512 outstanding confirms to a quorum queue bound to the
// producer's topic exchange.
func (b *bench) limit(ctx context.Context, n int, round string) (rate, error) {
	producer, err := b.producer(ctx)
	if err != nil {
		return rate{}, err
	}
	msgs, err := warrenPublishings(producer, n)
	if err != nil {
		return rate{}, err
	}
	del, err := b.quorumQueue(b.name("limit"), publisher.ExchangeName(producer))
	if err != nil {
		return rate{}, err
	}
	defer del()
	b.settle(ctx, "1 the limit"+round)
	bar := newBar(n, "1 the limit: raw publish"+round)
	m := b.meter(0)
	took, err := rawPublish(ctx, b.o.url, publisher.ExchangeName(producer), msgs, window, bar)
	if err != nil {
		return rate{}, err
	}
	r := rate{N: n, Took: took, CPU: m.stop()}
	b.logf("1 the limit%s: raw publish of %d messages (%d-byte bodies) in %s: %.0f msgs/s, %.0f awaiting their confirm on average (%s)", round, n, len(msgs[0].Body), took.Round(time.Millisecond), r.PerSec(), lastRawWindow, r.CPU)
	return r, nil
}

// relayDrain runs `warren relay` as its own process on a database holding
// n unpublished rows and returns the time from its "relay started" line to
// the last row's published_at, and its peak resident memory.
func (b *bench) relayDrain(ctx context.Context, n int, label string, maxQueue int) (drain, error) {
	producer, err := b.producer(ctx)
	if err != nil {
		return drain{}, err
	}
	k := b.seq.Add(1)
	db, path, err := b.newDB(ctx, fmt.Sprintf("relay-%d-%d", n, k))
	if err != nil {
		return drain{}, err
	}
	_ = db.Close()
	defer removeDB(path)
	if err := fillOutbox(ctx, path, producer, n); err != nil {
		return drain{}, err
	}
	queue := b.name(fmt.Sprintf("drain-%d", k))
	del, err := b.boundedQueue(queue, publisher.ExchangeName(producer), maxQueue)
	if err != nil {
		return drain{}, err
	}
	defer del()
	if maxQueue > 0 {
		// Full before the relay starts: the broker drops a message for
		// every one the relay publishes, at any backlog, and holds the
		// same depth throughout.
		msgs, err := warrenPublishings(producer, maxQueue)
		if err != nil {
			return drain{}, err
		}
		if err := b.fillQueue(ctx, producer, queue, msgs); err != nil {
			return drain{}, err
		}
	}
	ro, err := wsql.Open(ctx, path, wsql.Options{ReadOnly: true})
	if err != nil {
		return drain{}, err
	}
	defer ro.Close()
	first, err := minUnpublished(ctx, ro)
	if err != nil {
		return drain{}, err
	}

	b.settle(ctx, label)
	p, err := b.startWarren([]string{"WARREN_DB=" + path, "WARREN_URL=" + b.o.url, "WARREN_LOG_LEVEL=info"}, "relay")
	if err != nil {
		return drain{}, err
	}
	defer p.kill()
	start, err := p.waitStarted(ctx, 30*time.Second)
	if err != nil {
		return drain{}, err
	}
	pid := p.cmd.Process.Pid
	m := b.meter(pid)
	bar := newBar(n, label)
	prog, err := waitDrained(ctx, ro, first, n, bar, p.done, 30*time.Minute)
	_ = bar.Finish()
	if err != nil {
		return drain{}, fmt.Errorf("%w\nrelay output:\n%s", err, p.output())
	}
	hwm := statusKiB(pid, "VmHWM")
	cpu := m.stop()
	end, err := lastPublished(ctx, ro, n)
	if err != nil {
		return drain{}, err
	}
	if err := p.stop(30 * time.Second); err != nil {
		return drain{}, fmt.Errorf("stop relay: %w\n%s", err, p.output())
	}
	inQueue := n
	if maxQueue > 0 {
		inQueue = maxQueue
	}
	if _, err := b.waitDepth(ctx, queue, inQueue, 30*time.Second, nil); err != nil {
		return drain{}, err
	}
	d := drain{rate: rate{N: n, Took: end.Sub(start), CPU: cpu}, HWMKiB: hwm}
	d.First, d.Last = prog.pace(n)
	if b.o.verbose {
		if tl, err := markTimeline(ctx, ro, start, 10); err == nil {
			b.logf("%s: rows marked per tenth of the drain, from the relay's start: %s", label, tl)
		}
	}
	b.logf("%s: %d rows in %s: %.0f events/s (%.0f/s over rows 10-20%%, %.0f/s over rows 80-90%%), peak RSS %.1f MiB (%s)",
		label, n, d.Took.Round(time.Millisecond), d.PerSec(), d.First, d.Last, float64(hwm)/1024, cpu)
	return d, nil
}

// markTimeline splits the time from start to the last published_at into
// parts and says how many rows were marked in each: where a drain was slow.
func markTimeline(ctx context.Context, ro *sql.DB, start time.Time, parts int) (string, error) {
	rows, err := ro.QueryContext(ctx, `SELECT published_at FROM warren_outbox WHERE published_at IS NOT NULL`)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var at []time.Time
	var last time.Time
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return "", err
		}
		t, err := wsql.ParseTime(s)
		if err != nil {
			return "", err
		}
		at = append(at, t)
		if t.After(last) {
			last = t
		}
	}
	if err := rows.Err(); err != nil {
		return "", err
	}
	span := last.Sub(start)
	if span <= 0 {
		return "", errors.New("no span")
	}
	counts := make([]int, parts)
	for _, t := range at {
		i := int(float64(t.Sub(start)) / float64(span) * float64(parts))
		counts[min(max(i, 0), parts-1)]++
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s per part:", (span / time.Duration(parts)).Round(time.Millisecond))
	for _, c := range counts {
		fmt.Fprintf(&sb, " %d", c)
	}
	return sb.String(), nil
}

// minUnpublished returns the lowest unpublished seq, 0 when every row is
// published. It reads the first entry of the relay's partial index: cheap
// at any backlog.
func minUnpublished(ctx context.Context, db *sql.DB) (int64, error) {
	var seq int64
	err := db.QueryRowContext(ctx, `SELECT seq FROM warren_outbox INDEXED BY warren_outbox_unpublished
		WHERE published_at IS NULL ORDER BY seq LIMIT 1`).Scan(&seq)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read backlog: %w", err)
	}
	return seq, nil
}

// progress is a drain's position over time: rows before the lowest
// unpublished one.
type progress struct {
	at   []time.Time
	done []int
}

// pace returns the drain rate over the first and the last tenth of the
// rows, to tell a relay that slows down as it goes from fixed costs at
// the start and the end.
func (p *progress) pace(n int) (first, last float64) {
	rate := func(from, to int) float64 {
		var t0, t1 time.Time
		var d0, d1 int
		for i, d := range p.done {
			if t0.IsZero() && d >= from {
				t0, d0 = p.at[i], d
			}
			if d >= to {
				t1, d1 = p.at[i], d
				break
			}
		}
		if t0.IsZero() || t1.IsZero() || !t1.After(t0) {
			return 0
		}
		return float64(d1-d0) / t1.Sub(t0).Seconds()
	}
	return rate(n/10, n/5), rate(n*8/10, n*9/10)
}

// waitDrained polls every 50ms until no row is unpublished.
func waitDrained(ctx context.Context, ro *sql.DB, first int64, n int, bar *progressbar.ProgressBar, exited <-chan struct{}, timeout time.Duration) (*progress, error) {
	p := &progress{}
	deadline := time.Now().Add(timeout)
	for {
		seq, err := minUnpublished(ctx, ro)
		if err != nil {
			return p, err
		}
		done := n
		if seq != 0 {
			done = int(seq - first)
		}
		p.at, p.done = append(p.at, time.Now()), append(p.done, done)
		_ = bar.Set(done)
		if seq == 0 {
			return p, nil
		}
		if time.Now().After(deadline) {
			return p, fmt.Errorf("rows from seq %d on still unpublished after %s", seq, timeout)
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-exited:
			return p, errors.New("the relay exited before the backlog was published")
		case <-ctx.Done():
			return p, ctx.Err()
		}
	}
}

// lastPublished checks that all n rows are published and returns the last
// published_at (millisecond resolution, stamped by the relay when it marks
// the rows).
func lastPublished(ctx context.Context, ro *sql.DB, n int) (time.Time, error) {
	var count int
	var last sql.NullString
	if err := ro.QueryRowContext(ctx, `SELECT count(*), max(published_at) FROM warren_outbox WHERE published_at IS NOT NULL`).Scan(&count, &last); err != nil {
		return time.Time{}, fmt.Errorf("read published rows: %w", err)
	}
	if count != n {
		return time.Time{}, fmt.Errorf("%d of %d rows published", count, n)
	}
	return wsql.ParseTime(last.String)
}

// profileDrain drains an n-row backlog once more with the relay in this
// process under the CPU profiler (the relay process has no pprof endpoint)
// and writes dir/relay-cpu.pprof.
func (b *bench) profileDrain(ctx context.Context, n int, dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	producer, err := b.producer(ctx)
	if err != nil {
		return "", err
	}
	k := b.seq.Add(1)
	db, path, err := b.newDB(ctx, fmt.Sprintf("profile-%d", k))
	if err != nil {
		return "", err
	}
	defer removeDB(path)
	defer db.Close()
	if err := fillOutbox(ctx, path, producer, n); err != nil {
		return "", err
	}
	del, err := b.quorumQueue(b.name(fmt.Sprintf("profile-%d", k)), publisher.ExchangeName(producer))
	if err != nil {
		return "", err
	}
	defer del()
	ro, err := wsql.Open(ctx, path, wsql.Options{ReadOnly: true})
	if err != nil {
		return "", err
	}
	defer ro.Close()
	first, err := minUnpublished(ctx, ro)
	if err != nil {
		return "", err
	}
	pub, err := publisher.New(publisher.Config{Connection: publisher.ConnectionConfig{URL: b.o.url}, Logger: quietLogger()})
	if err != nil {
		return "", err
	}
	defer pub.Close()
	if err := pub.Connect(ctx); err != nil {
		return "", err
	}
	r, err := relay.New(relay.Config{DB: db, DBPath: path, Publisher: pub, Logger: quietLogger()})
	if err != nil {
		return "", err
	}
	file := filepath.Join(dir, "relay-cpu.pprof")
	f, err := os.Create(file)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := pprof.StartCPUProfile(f); err != nil {
		return "", err
	}
	tf, err := os.Create(filepath.Join(dir, "relay.trace"))
	if err != nil {
		return "", err
	}
	defer tf.Close()
	if err := trace.Start(tf); err != nil {
		return "", err
	}
	rctx, stop := context.WithCancel(ctx)
	exited := make(chan struct{})
	go func() { defer close(exited); _ = r.Run(rctx) }()
	start := time.Now()
	stopSampling := sample(func() int { return pub.Stats().Outstanding })
	// The heap half way through the drain, after a collection.
	heapDone := make(chan struct{})
	go func() {
		defer close(heapDone)
		for {
			seq, err := minUnpublished(ctx, ro)
			if err != nil || seq == 0 || seq-first >= int64(n/2) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		runtime.GC()
		if hf, err := os.Create(filepath.Join(dir, "relay-heap.pprof")); err == nil {
			_ = pprof.Lookup("heap").WriteTo(hf, 0)
			_ = hf.Close()
		}
	}()
	bar := newBar(n, "2 relay drain, in process, profiled")
	_, err = waitDrained(ctx, ro, first, n, bar, exited, 30*time.Minute)
	_ = bar.Finish()
	took := time.Since(start)
	outstanding := stopSampling()
	pprof.StopCPUProfile()
	trace.Stop()
	<-heapDone
	stop()
	<-exited
	if err != nil {
		return "", err
	}
	b.logf("figure 2, profiled in process: %d rows in %s (%.0f events/s), %.0f awaiting their confirm on average; CPU profile in %s (go tool pprof -top %s), heap profile and execution trace (go tool trace) next to it", n, took.Round(time.Millisecond), float64(n)/took.Seconds(), outstanding, file, file)
	return file, nil
}

// growthQueue bounds the queue of the growth drains: the broker drops the
// oldest messages beyond it, so that at either backlog the relay publishes
// into a queue of the same depth and only the outbox grows. Without it the
// large drain measures a quorum queue growing to a million messages. The
// queue is filled to the bound before each drain, so that the broker
// drops the oldest message for each one published at either backlog (a
// small drain into an empty queue would only store them; measured, the
// broker's CPU per message was the same, 42 µs, either way).
const growthQueue = 10_000

// growth is figure 6: relay drains at a small backlog (several times; the
// median counts) and at a large one.
type growthResult struct {
	Small []drain // sorted by events/s
	Large drain
}

// SmallMedian is the median small drain.
func (g growthResult) SmallMedian() drain { return g.Small[len(g.Small)/2] }

func (b *bench) growth(ctx context.Context, s sizes) (growthResult, error) {
	var g growthResult
	for i := 0; i < s.SmallRuns; i++ {
		d, err := b.relayDrain(ctx, s.GrowthSmall, fmt.Sprintf("6 relay drain %s (%d/%d)", count(s.GrowthSmall), i+1, s.SmallRuns), growthQueue)
		if err != nil {
			return g, err
		}
		g.Small = append(g.Small, d)
	}
	slices.SortFunc(g.Small, func(a, b drain) int {
		switch {
		case a.PerSec() < b.PerSec():
			return -1
		case a.PerSec() > b.PerSec():
			return 1
		}
		return 0
	})
	d, err := b.relayDrain(ctx, s.GrowthLarge, "6 relay drain "+count(s.GrowthLarge), growthQueue)
	if err != nil {
		return g, err
	}
	g.Large = d
	return g, nil
}
