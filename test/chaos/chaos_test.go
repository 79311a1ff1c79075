package chaos

import (
	"context"
	dbsql "database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
	"github.com/warrenmq/warren/test/broker"
	"github.com/warrenmq/warren/test/proxy"
	"github.com/warrenmq/warren/test/testenv"
)

// scenario is one chaos run's size and faults.
type scenario struct {
	Events     int // appended by the application process
	Aggregates int // the events are spread over
	MaxBatch   int // most events in one application transaction

	Kills   int              // SIGKILLs, relay and consumer together (at least)
	KillGap [2]time.Duration // random pause between two kills

	CutEvery  time.Duration    // about how often the proxy cuts every connection
	CutFor    [2]time.Duration // how long a cut lasts
	Stall     time.Duration    // the one stall of all traffic
	Heartbeat time.Duration    // WARREN_HEARTBEAT for the relay and the consumer

	NodeDown time.Duration // between StopApp and StartApp of the node
	AlarmFor time.Duration // the memory alarm

	Drain time.Duration // allowed after the faults for everything to arrive

	// ConsumerConcurrency is the consumer's concurrency (0: the default,
	// 32). Order per aggregate at the consumer is asserted only with 1:
	// with more, the queue is read by that many channels at once.
	ConsumerConcurrency int
}

// fault is one fault the test caused, from its start to its end.
type fault struct {
	kind       string // relay-kill, consumer-kill, cut, stall, node-restart, memory-alarm
	start, end time.Time
	probe      string // the event appended when it ended, to time the first confirm after it
}

// faultLog collects the faults; safe for concurrent use.
type faultLog struct {
	mu       sync.Mutex
	db       *dbsql.DB
	producer string // of the probes: an exchange no queue is bound to
	faults   []fault
	errs     []error
}

// add records a fault that ended. Unless it was the consumer's, it appends
// a probe event, under a producer of its own that no queue is bound to, so
// that there is something to confirm at once even when the application is
// done: its published_at is the first confirm after the fault.
func (l *faultLog) add(kind string, start, end time.Time) {
	f := fault{kind: kind, start: start, end: end}
	if kind != "consumer-kill" {
		ids, err := outbox.AppendDB(context.Background(), l.db, outbox.Event{Producer: l.producer, Type: "probe." + kind, Payload: []byte(`{}`)})
		if err == nil {
			f.probe = ids[0]
		}
		l.mu.Lock()
		l.errs = append(l.errs, err)
		l.mu.Unlock()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.faults = append(l.faults, f)
}

func (l *faultLog) count(kind string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, f := range l.faults {
		if f.kind == kind {
			n++
		}
	}
	return n
}

// runChaos runs the scenario and checks and prints the outcome.
func runChaos(t *testing.T, sc scenario) {
	began := time.Now()
	node := broker.Start(t, broker.Options{})
	px := proxy.Start(t, fmt.Sprintf("127.0.0.1:%d", node.Port))
	url := px.URL(node.URL)

	dir := t.TempDir()
	appPath := filepath.Join(dir, "app.db")
	consumerPath := filepath.Join(dir, "consumer.db")
	appDB := openMigrated(t, appPath)
	consumerDB := openMigrated(t, consumerPath)
	producer := testenv.Name("chaos")
	app := testenv.Name("chaos-billing")
	env := []string{"WARREN_HEARTBEAT=" + sc.Heartbeat.String(), "WARREN_LOG_LEVEL=info"}

	// The consumer declares and binds its queue before anything is
	// published: an event published before that is unroutable.
	consumer := startService(t, "consumer", filepath.Join(dir, "consumer.log"), env,
		consumerBin, "-db", consumerPath, "-url", url, "-app", app, "-from", producer,
		"-concurrency", strconv.Itoa(sc.ConsumerConcurrency))
	waitLog(t, consumer.logPath, "ready", 60*time.Second)
	relay := startService(t, "relay", filepath.Join(dir, "relay.log"),
		append(env, "WARREN_DB="+appPath, "WARREN_URL="+url), warrenBin, "relay")
	waitLog(t, relay.logPath, "relay started", 60*time.Second)
	appProc := startOnce(t, "application", filepath.Join(dir, "app.log"),
		appBin, "-db", appPath, "-producer", producer, "-events", strconv.Itoa(sc.Events),
		"-aggregates", strconv.Itoa(sc.Aggregates), "-max-batch", strconv.Itoa(sc.MaxBatch))
	started := time.Now()

	faults := &faultLog{db: appDB, producer: producer + "-probe"}
	var killedRelayAt time.Time
	var killMu sync.Mutex
	relay.onStart = func(at time.Time) {
		killMu.Lock()
		defer killMu.Unlock()
		if !killedRelayAt.IsZero() {
			faults.add("relay-kill", killedRelayAt, at)
			killedRelayAt = time.Time{}
		}
	}

	// Memory samples every second, besides those before each kill and at
	// the end: the application exits when it is done.
	sampling := make(chan struct{})
	go func() {
		for i := 0; ; i++ {
			select {
			case <-sampling:
				return
			case <-time.After(50 * time.Millisecond):
				appProc.sample()
				if i%20 == 0 {
					relay.sample()
					consumer.sample()
				}
			}
		}
	}()
	defer close(sampling)

	var wg sync.WaitGroup
	killsDone := make(chan struct{})
	wg.Add(3)
	// Kills: the relay or the consumer, at random moments; the supervisor
	// restarts them at once.
	go func() {
		defer wg.Done()
		defer close(killsDone)
		for k := 0; k < sc.Kills; k++ {
			time.Sleep(randDur(sc.KillGap))
			if rand.IntN(2) == 0 {
				killMu.Lock()
				killedRelayAt = time.Now()
				killMu.Unlock()
				relay.kill()
			} else {
				at := time.Now()
				consumer.kill()
				faults.add("consumer-kill", at, at)
			}
		}
	}()
	// The network: cuts every few seconds, and once a stall, until the
	// kills are done.
	go func() {
		defer wg.Done()
		stalled := false
		for cuts := 0; ; cuts++ {
			select {
			case <-killsDone:
				if stalled {
					return
				}
			case <-time.After(randDur([2]time.Duration{sc.CutEvery / 2, sc.CutEvery * 3 / 2})):
			}
			if cuts == 3 || (!stalled && isClosed(killsDone)) {
				at := time.Now()
				px.Stall()
				time.Sleep(sc.Stall)
				px.Restore()
				faults.add("stall", at, time.Now())
				stalled = true
				continue
			}
			at := time.Now()
			px.Cut()
			time.Sleep(randDur(sc.CutFor))
			px.Restore()
			faults.add("cut", at, time.Now())
		}
	}()
	// The broker: the node's application is stopped and started once, and
	// its memory alarm is raised once.
	go func() {
		defer wg.Done()
		time.Sleep(sc.KillGap[1])
		at := time.Now()
		if err := node.StopApp(); err != nil {
			t.Errorf("stop_app: %v", err)
		}
		time.Sleep(sc.NodeDown)
		if err := node.StartApp(); err != nil {
			t.Errorf("start_app: %v", err)
		}
		faults.add("node-restart", at, time.Now())
		time.Sleep(2 * sc.KillGap[1])
		at = time.Now()
		if err := node.SetMemoryAlarm(true); err != nil {
			t.Errorf("raise memory alarm: %v", err)
		}
		time.Sleep(sc.AlarmFor)
		if err := node.SetMemoryAlarm(false); err != nil {
			t.Errorf("clear memory alarm: %v", err)
		}
		faults.add("memory-alarm", at, time.Now())
	}()
	wg.Wait()
	faultsEnded := time.Now()
	t.Logf("faults done after %s", faultsEnded.Sub(started).Round(time.Millisecond))

	// Everything arrives: the application is done, every row is published,
	// every event processed and the queue has stayed empty for a while.
	direct := testenv.Conn(t, node.URL)
	queues := []string{publisher.QueueName(app), publisher.RetryQueueName(app, 100*time.Millisecond), publisher.PoisonQueueName(app)}
	deadline := time.Now().Add(sc.Drain)
	var quietSince time.Time
	for {
		published, total := countOutbox(t, appDB, producer)
		processed := countProcessed(t, consumerDB, app)
		depth := queueDepths(t, direct, queues)
		if total == sc.Events && published == total && processed == sc.Events && sum(depth) == 0 {
			if quietSince.IsZero() {
				quietSince = time.Now()
			}
			if time.Since(quietSince) > 3*time.Second {
				break
			}
		} else {
			quietSince = time.Time{}
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %d of %d events appended, %d published, %d processed, queues %v %v\nrelay:\n%s\nconsumer:\n%s\napplication:\n%s",
				sc.Drain, total, sc.Events, published, processed, queues, depth,
				tail(relay.logPath, 30), tail(consumer.logPath, 30), tail(appProc.logPath, 10))
		}
		time.Sleep(250 * time.Millisecond)
	}
	drained := time.Now()
	relayClean := relay.stop(30 * time.Second)
	consumerClean := consumer.stop(30 * time.Second)
	appProc.stop(time.Second)
	require.True(t, relayClean, "the relay stops cleanly on SIGTERM:\n%s", tail(relay.logPath, 20))
	require.True(t, consumerClean, "the consumer stops cleanly on SIGTERM:\n%s", tail(consumer.logPath, 20))

	// The outcome.
	published, total := countOutbox(t, appDB, producer)
	require.Equal(t, sc.Events, total, "outbox rows")
	require.Equal(t, total, published, "no outbox row is unpublished")
	var unpublished int
	require.NoError(t, appDB.QueryRow(`SELECT count(*) FROM warren_outbox WHERE published_at IS NULL`).Scan(&unpublished))
	require.Zero(t, unpublished, "no outbox row is unpublished, probes included")
	for _, err := range faults.errs {
		require.NoError(t, err, "append a probe")
	}
	require.Equal(t, []int{0, 0, 0}, queueDepths(t, direct, queues), "no message is left in %v", queues)
	if exits := appProc.unexpectedExits(); len(exits) != 1 || !strings.Contains(exits[0], "exit status 0") {
		t.Errorf("the application ran once and exited 0: %q", exits)
	}

	_, err := consumerDB.Exec(`ATTACH DATABASE ? AS app`, appPath)
	require.NoError(t, err)
	var processed, matched, notProcessed, effects, distinctEffects, dups int
	require.NoError(t, consumerDB.QueryRow(`SELECT count(*), coalesce(sum(duplicates), 0) FROM warren_inbox WHERE consumer = ? AND status = 'processed'`, app).Scan(&processed, &dups))
	require.NoError(t, consumerDB.QueryRow(`SELECT count(*) FROM warren_inbox WHERE consumer = ? AND status <> 'processed'`, app).Scan(&notProcessed))
	require.NoError(t, consumerDB.QueryRow(`SELECT count(*) FROM warren_inbox i JOIN app.warren_outbox o ON o.event_id = i.message_id
		WHERE i.consumer = ? AND i.status = 'processed'`, app).Scan(&matched))
	require.NoError(t, consumerDB.QueryRow(`SELECT count(*), count(DISTINCT message_id) FROM effects`).Scan(&effects, &distinctEffects))
	require.Equal(t, sc.Events, processed, "every event has a processed inbox row")
	require.Equal(t, sc.Events, matched, "each processed inbox row is an event of the outbox")
	require.Zero(t, notProcessed, "no inbox row retrying or poisoned")
	require.Equal(t, sc.Events, effects, "the side-effect table holds one row per event")
	require.Equal(t, sc.Events, distinctEffects, "no event's side effect happened twice")

	// Per-aggregate order at the consumer: in handler commit order, the
	// versions of an aggregate increase among first, not redelivered,
	// handler runs; over all runs the out-of-order ones are counted.
	rows, err := consumerDB.Query(`SELECT aggregate_id, version, attempt, redelivered FROM effects ORDER BY seq`)
	require.NoError(t, err)
	lastFirst := map[string]int64{}
	lastAny := map[string]int64{}
	var retried, outOfOrderRetried, outOfOrderFirst int
	var orderErrs []string
	for rows.Next() {
		var agg string
		var v int64
		var attempt int
		var redelivered bool
		require.NoError(t, rows.Scan(&agg, &v, &attempt, &redelivered))
		if prev, ok := lastAny[agg]; ok && v <= prev {
			outOfOrderRetried++
		}
		lastAny[agg] = max(v, lastAny[agg])
		if attempt > 1 || redelivered {
			retried++
			continue
		}
		if prev, ok := lastFirst[agg]; ok && v <= prev {
			outOfOrderFirst++
			if len(orderErrs) < 10 {
				orderErrs = append(orderErrs, fmt.Sprintf("aggregate %s: version %d handled after version %d", agg, v, prev))
			}
		}
		lastFirst[agg] = max(v, lastFirst[agg])
	}
	require.NoError(t, rows.Err())
	if sc.ConsumerConcurrency == 1 {
		require.Empty(t, orderErrs, "per-aggregate order of first handler runs")
	} else if len(orderErrs) > 0 {
		t.Logf("concurrency %d: %d first handler runs behind a later version of their aggregate, e.g. %s", sc.ConsumerConcurrency, outOfOrderFirst, orderErrs[0])
	}
	var versionsOK int
	require.NoError(t, consumerDB.QueryRow(`SELECT count(*) FROM (SELECT aggregate_id, count(*) AS n, min(version) AS lo, max(version) AS hi
		FROM effects GROUP BY aggregate_id) WHERE lo = 0 AND hi = n - 1`).Scan(&versionsOK))
	require.Equal(t, len(lastAny), versionsOK, "each aggregate's versions are 0..n-1 without a gap")

	// Longest time from the end of a fault to the first confirm after it:
	// the first row marked after the end (the probe at the latest).
	longest := map[string]time.Duration{}
	measured, alones := 0, 0
	for _, f := range faults.faults {
		if f.probe == "" {
			continue
		}
		var first string
		require.NoError(t, appDB.QueryRow(`SELECT coalesce(min(published_at), '') FROM warren_outbox WHERE published_at >= ?`, wsql.FormatTime(f.end)).Scan(&first))
		at, err := wsql.ParseTime(first)
		require.NoError(t, err, "a confirm after the %s that ended at %s", f.kind, f.end)
		measured++
		longest["any"] = max(longest["any"], at.Sub(f.end))
		// Per kind, only faults alone: no other relay-side fault overlaps
		// the time from this one's end to the confirm (a relay restarted
		// during the stall waits for the stall's end).
		alone := true
		for _, g := range faults.faults {
			if g != f && g.probe != "" && g.start.Before(at) && g.end.After(f.end) {
				alone = false
			}
		}
		if alone {
			alones++
			longest[f.kind] = max(longest[f.kind], at.Sub(f.end))
		}
	}
	var perKind []string
	for _, k := range []string{"relay-kill", "cut", "stall", "node-restart", "memory-alarm"} {
		if d, ok := longest[k]; ok {
			perKind = append(perKind, fmt.Sprintf("%s %s", k, d.Round(time.Millisecond)))
		}
	}

	relayExits, consumerExits := relay.unexpectedExits(), consumer.unexpectedExits()
	for _, e := range append(slices.Clone(relayExits), consumerExits...) {
		t.Logf("a process ended by itself and was restarted: %s", e)
	}
	report := []string{
		fmt.Sprintf("events                 %d over %d aggregates, appended in %s (%s)", sc.Events, sc.Aggregates,
			strings.TrimPrefix(strings.TrimSpace(tail(appProc.logPath, 1)), fmt.Sprintf("done %d in ", sc.Events)), "application process, full speed"),
		fmt.Sprintf("run                    %s: faults for %s, drained %s after the last fault; %s in all with the node's start",
			drained.Sub(started).Round(time.Second), faultsEnded.Sub(started).Round(time.Second), drained.Sub(faultsEnded).Round(time.Second), time.Since(began).Round(time.Second)),
		fmt.Sprintf("kills (SIGKILL)        %d: relay %d, consumer %d", relay.kills+consumer.kills, relay.kills, consumer.kills),
		fmt.Sprintf("connection cuts        %d, plus %d stall of %s (heartbeat %s)", faults.count("cut"), faults.count("stall"), sc.Stall, sc.Heartbeat),
		fmt.Sprintf("broker                 %d node stop_app/start_app (%s down), %d memory alarm of %s", faults.count("node-restart"), sc.NodeDown, faults.count("memory-alarm"), sc.AlarmFor),
		fmt.Sprintf("exits on their own     relay %d, consumer %d (restarted by the supervisor)", len(relayExits), len(consumerExits)),
		fmt.Sprintf("inbox                  %d processed, %d duplicates absorbed (sum of warren_inbox.duplicates)", processed, dups),
		fmt.Sprintf("side effects           %d rows, %d distinct events", effects, distinctEffects),
		fmt.Sprintf("order                  consumer concurrency %d: %d of %d first handler runs behind a later version of their aggregate; %d runs were retries or redeliveries; %d of all runs out of order",
			sc.ConsumerConcurrency, outOfOrderFirst, effects-retried, retried, outOfOrderRetried),
		fmt.Sprintf("fault to first confirm longest %s over %d relay-side faults; over the %d that did not overlap another: %s", longest["any"].Round(time.Millisecond), measured, alones, strings.Join(perKind, ", ")),
		fmt.Sprintf("peak memory (VmHWM)    relay %s, consumer %s, application %s", mib(relay.hwmKB), mib(consumer.hwmKB), mib(appProc.hwmKB)),
	}
	t.Logf("chaos run:\n%s", strings.Join(report, "\n"))
}

func openMigrated(t *testing.T, path string) *dbsql.DB {
	t.Helper()
	db, err := wsql.Open(context.Background(), path, wsql.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	_, err = wsql.Migrate(context.Background(), db)
	require.NoError(t, err)
	return db
}

func countOutbox(t *testing.T, db *dbsql.DB, producer string) (published, total int) {
	t.Helper()
	require.NoError(t, db.QueryRow(`SELECT count(published_at), count(*) FROM warren_outbox WHERE producer = ?`, producer).Scan(&published, &total))
	return published, total
}

func countProcessed(t *testing.T, db *dbsql.DB, app string) int {
	t.Helper()
	var n int
	require.NoError(t, db.QueryRow(`SELECT count(*) FROM warren_inbox WHERE consumer = ? AND status = 'processed'`, app).Scan(&n))
	return n
}

// queueDepths returns the ready messages of each queue; a queue that does
// not exist has none.
func queueDepths(t *testing.T, conn *amqp.Connection, queues []string) []int {
	t.Helper()
	out := make([]int, len(queues))
	for i, q := range queues {
		ch, err := conn.Channel()
		require.NoError(t, err)
		info, err := ch.QueueDeclarePassive(q, true, false, false, false, nil)
		var aerr *amqp.Error
		if errors.As(err, &aerr) && aerr.Code == amqp.NotFound {
			continue
		}
		require.NoError(t, err, "inspect queue %s", q)
		out[i] = info.Messages
		_ = ch.Close()
	}
	return out
}

func sum(xs []int) int {
	s := 0
	for _, x := range xs {
		s += x
	}
	return s
}

func randDur(r [2]time.Duration) time.Duration {
	if r[1] <= r[0] {
		return r[0]
	}
	return r[0] + rand.N(r[1]-r[0])
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func mib(kb int64) string { return fmt.Sprintf("%.0f MiB", float64(kb)/1024) }
