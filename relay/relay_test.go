package relay_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/relay"
	"github.com/warrenmq/warren/test/testenv"
)

type bundle struct {
	db       *sql.DB
	path     string
	producer string
	exchange string
	pub      *publisher.Publisher
}

func setup(t *testing.T) *bundle {
	t.Helper()
	db, path := testenv.DB(t)
	producer := testenv.Name("relaytest")
	pub := newPublisher(t, publisher.Config{})
	return &bundle{db: db, path: path, producer: producer, exchange: publisher.ExchangeName(producer), pub: pub}
}

// newPublisher returns a publisher with cfg on the test broker, connected,
// and closed when the test ends.
func newPublisher(t *testing.T, cfg publisher.Config) *publisher.Publisher {
	t.Helper()
	cfg.Connection.URL = testenv.URL()
	pub, err := publisher.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = pub.Close() })
	require.NoError(t, pub.Connect(context.Background()))
	return pub
}

// start runs a relay until the test ends (or stop is called) and returns a
// function that stops it gracefully and returns Run's error.
func start(t *testing.T, cfg relay.Config) func() error {
	t.Helper()
	r, err := relay.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(60 * time.Second):
				runErr = errors.New("relay did not stop within 60s")
			}
		})
		return runErr
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

func waitPublished(t *testing.T, db *sql.DB, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var c int
		require.NoError(t, db.QueryRow(`SELECT count(*) FROM warren_outbox WHERE published_at IS NOT NULL`).Scan(&c))
		if c >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d rows marked published after %s", c, n, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCommittedEventsArriveOnceWithEveryProperty(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, b.exchange)

	// Rolled back: never published.
	tx, err := b.db.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = outbox.Append(ctx, tx, outbox.Event{Producer: b.producer, Type: "company.created", Payload: []byte(`{"rolled":"back"}`)})
	require.NoError(t, err)
	require.NoError(t, tx.Rollback())

	// Committed through Go, with every field.
	tx, err = b.db.BeginTx(ctx, nil)
	require.NoError(t, err)
	ids, err := outbox.Append(ctx, tx, outbox.Event{
		Producer: b.producer, Type: "company.updated",
		AggregateType: "company", AggregateID: "42", AggregateVersion: outbox.Version(7),
		ContentType: "application/json", Headers: map[string]string{"tenant": "acme"},
		CorrelationID: "corr-9", Expiration: 60 * time.Second,
		Traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		Payload:     []byte(`{"name":"Acme"}`),
	})
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	// Inserted by plain SQL, as another language would.
	_, err = b.db.Exec(`INSERT INTO warren_outbox (event_id, producer, event_type, aggregate_type, aggregate_id, payload, headers)
		VALUES ('plain-sql-1', ?, 'company.deleted', 'company', '43', X'00FF10', '{"source":"python"}')`, b.producer)
	require.NoError(t, err)

	stop := start(t, relay.Config{DB: b.db, DBPath: b.path, Publisher: b.pub})
	waitPublished(t, b.db, 2, 20*time.Second)

	ds := testenv.Consume(t, conn, queue, 3, 2*time.Second)
	require.Len(t, ds, 2, "exactly the two committed events arrive")
	// Different aggregates may arrive in either order.
	if ds[0].MessageId == "plain-sql-1" {
		ds[0], ds[1] = ds[1], ds[0]
	}
	d := ds[0]
	require.Equal(t, ids[0], d.MessageId)
	require.Equal(t, "company.updated", d.Type)
	require.Equal(t, "company.updated", d.RoutingKey)
	require.Equal(t, b.exchange, d.Exchange)
	require.Equal(t, b.producer, d.AppId)
	require.Equal(t, "application/json", d.ContentType)
	require.Equal(t, uint8(2), d.DeliveryMode)
	require.Equal(t, "corr-9", d.CorrelationId)
	require.Equal(t, "60000", d.Expiration)
	require.WithinDuration(t, time.Now(), d.Timestamp, time.Minute)
	require.Equal(t, "company", d.Headers["aggregate-type"])
	require.Equal(t, "42", d.Headers["aggregate-id"])
	require.EqualValues(t, 7, d.Headers["aggregate-version"])
	require.Equal(t, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", d.Headers["traceparent"])
	require.Equal(t, "acme", d.Headers["tenant"])
	require.Equal(t, `{"name":"Acme"}`, string(d.Body))

	p := ds[1]
	require.Equal(t, "plain-sql-1", p.MessageId)
	require.Equal(t, "company.deleted", p.Type)
	require.Equal(t, "43", p.Headers["aggregate-id"])
	require.Equal(t, "python", p.Headers["source"])
	require.Equal(t, []byte{0x00, 0xFF, 0x10}, p.Body)
	require.Equal(t, "application/json", p.ContentType)

	require.NoError(t, stop())
	var unpublished int
	require.NoError(t, b.db.QueryRow(`SELECT count(*) FROM warren_outbox WHERE published_at IS NULL`).Scan(&unpublished))
	require.Zero(t, unpublished)
}

// flakyPublisher fails a share of publishes before or after the real
// publish, as nacks and lost confirms do, to prove the relay's ordering
// and retries; the messages go to the real broker.
type flakyPublisher struct {
	message.Publisher
	failures atomic.Int64
	rate     float64
}

func (f *flakyPublisher) Publish(topic string, msgs ...*message.Message) error {
	switch r := rand.Float64(); {
	case r < f.rate/2:
		f.failures.Add(1)
		return errors.New("injected: nacked")
	case r < f.rate:
		// Published and confirmed, but the confirm was "lost": the relay
		// must publish it again, and never let a later event of the same
		// aggregate overtake it.
		if err := f.Publisher.Publish(topic, msgs...); err != nil {
			return err
		}
		f.failures.Add(1)
		return errors.New("injected: confirm lost")
	}
	return f.Publisher.Publish(topic, msgs...)
}

func TestOrderPerAggregateHoldsAcrossFailures(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, b.exchange)

	const events, aggregates = 3000, 20
	flaky := &flakyPublisher{Publisher: b.pub, rate: 0.05}
	start(t, relay.Config{DB: b.db, DBPath: b.path, Publisher: flaky, RetryMin: 5 * time.Millisecond, RetryMax: 50 * time.Millisecond})

	// Append while the relay runs, in many small transactions.
	for i := 0; i < events; i += 10 {
		var evs []outbox.Event
		for j := i; j < i+10; j++ {
			evs = append(evs, outbox.Event{Producer: b.producer, Type: "thing.changed",
				AggregateType: "thing", AggregateID: fmt.Sprint(j % aggregates), AggregateVersion: outbox.Version(int64(j / aggregates)),
				Payload: []byte(`{}`)})
		}
		_, err := outbox.AppendDB(ctx, b.db, evs...)
		require.NoError(t, err)
	}
	waitPublished(t, b.db, events, 60*time.Second)

	ds := testenv.Consume(t, conn, queue, 1<<30, 3*time.Second)
	seen := map[string]bool{}
	last := map[string]int64{}
	dups := 0
	for _, d := range ds {
		if seen[d.MessageId] {
			dups++
			continue
		}
		seen[d.MessageId] = true
		agg := d.Headers["aggregate-id"].(string)
		v := d.Headers["aggregate-version"].(int64)
		if prev, ok := last[agg]; ok {
			require.Equal(t, prev+1, v, "aggregate %s: version %d arrived after %d", agg, v, prev)
		} else {
			require.Zero(t, v, "aggregate %s started at version %d", agg, v)
		}
		last[agg] = v
	}
	require.Len(t, seen, events, "every event arrived")
	t.Logf("%d events, %d injected failures, %d duplicates in the queue; per-aggregate order held", events, flaky.failures.Load(), dups)
	require.Positive(t, flaky.failures.Load())
}

func TestInvalidRowWaitsAndDoesNotBlockOthers(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, b.exchange)

	// A bad row for aggregate A, then a good one for A and one for B.
	_, err := b.db.Exec(`INSERT INTO warren_outbox (event_id, producer, event_type, aggregate_id, payload, headers)
		VALUES ('bad-1', ?, 't', 'A', '{}', '{"n": 1}')`, b.producer)
	require.NoError(t, err)
	_, err = outbox.AppendDB(ctx, b.db,
		outbox.Event{ID: "a-2", Producer: b.producer, Type: "t", AggregateID: "A", Payload: []byte(`{}`)},
		outbox.Event{ID: "b-1", Producer: b.producer, Type: "t", AggregateID: "B", Payload: []byte(`{}`)})
	require.NoError(t, err)

	start(t, relay.Config{DB: b.db, DBPath: b.path, Publisher: b.pub, RetryMin: 20 * time.Millisecond, RetryMax: 100 * time.Millisecond})
	ds := testenv.Consume(t, conn, queue, 1, 10*time.Second)
	require.Len(t, ds, 1)
	require.Equal(t, "b-1", ds[0].MessageId, "B is not blocked by A's bad row")
	require.Empty(t, testenv.Consume(t, conn, queue, 1, 500*time.Millisecond), "A's later event waits behind the bad row")

	// The operator fixes the row: both of A's events follow, in order.
	_, err = b.db.Exec(`UPDATE warren_outbox SET headers = '{"n":"1"}' WHERE event_id = 'bad-1'`)
	require.NoError(t, err)
	ds = testenv.Consume(t, conn, queue, 2, 10*time.Second)
	require.Len(t, ds, 2)
	require.Equal(t, "bad-1", ds[0].MessageId)
	require.Equal(t, "a-2", ds[1].MessageId)
}

func TestStandbyTakesOverInProcess(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, b.exchange)

	stopFirst := start(t, relay.Config{DB: b.db, DBPath: b.path, Publisher: b.pub})
	_, err := outbox.AppendDB(ctx, b.db, outbox.Event{Producer: b.producer, Type: "t", Payload: []byte(`1`)})
	require.NoError(t, err)
	waitPublished(t, b.db, 1, 10*time.Second)

	second := start(t, relay.Config{DB: b.db, DBPath: b.path, Publisher: b.pub})
	_ = second
	fi, err := os.Stat(b.path + ".relay.lock")
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "the lock file is private")
	time.Sleep(300 * time.Millisecond) // the second is a standby now
	require.NoError(t, stopFirst())
	_, err = outbox.AppendDB(ctx, b.db, outbox.Event{Producer: b.producer, Type: "t", Payload: []byte(`2`)})
	require.NoError(t, err)
	waitPublished(t, b.db, 2, 10*time.Second)
	require.Len(t, testenv.Consume(t, conn, queue, 2, 5*time.Second), 2)
}

func TestRunRefusesAnUnmigratedDatabase(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := b.db.Exec(`DROP TABLE warren_schema`)
	require.NoError(t, err)
	r, err := relay.New(relay.Config{DB: b.db, DBPath: b.path, Publisher: b.pub})
	require.NoError(t, err)
	err = r.Run(context.Background())
	require.ErrorContains(t, err, "warren migrate")
}

func TestConfigValidation(t *testing.T) {
	t.Parallel()
	_, err := relay.New(relay.Config{})
	require.ErrorContains(t, err, "DB is required")
	require.ErrorContains(t, err, "DBPath is required")
	require.ErrorContains(t, err, "Publisher is required")
}

// TestBatchRowsAreSettledOneByOne: a backlog goes to the publisher in
// batches (fewer Router messages than rows), and each row of a batch is
// marked or retried on its own. With the unroutable policy "keep", the
// rows no queue is bound for fail inside batches of rows that succeed:
// those are marked once and arrive once, the failed ones stay unpublished.
// It holds on both of the relay's batch paths: PublishPrepared
// (*publisher.Publisher) and PublishEach (a Watermill publisher that
// reports each message).
func TestBatchRowsAreSettledOneByOne(t *testing.T) {
	t.Parallel()
	for _, path := range []string{"PublishPrepared", "PublishEach"} {
		t.Run(path, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			ctx := context.Background()
			conn := testenv.Conn(t, testenv.URL())
			queue := testenv.BindQueue(t, conn, b.exchange, "routed.*")
			keep := newPublisher(t, publisher.Config{Unroutable: publisher.UnroutableKeep})

			const rows = 600
			var evs []outbox.Event
			for i := range rows {
				typ := "routed.event"
				if i%10 == 3 {
					typ = "unrouted.event"
				}
				evs = append(evs, outbox.Event{Producer: b.producer, Type: typ, AggregateID: fmt.Sprint(i), Payload: []byte(`{}`)})
			}
			_, err := outbox.AppendDB(ctx, b.db, evs...)
			require.NoError(t, err)

			rec := &recordingPublisher{Publisher: keep}
			var pub message.Publisher = rec
			if path == "PublishEach" {
				pub = eachOnly{rec}
			}
			stop := start(t, relay.Config{DB: b.db, DBPath: b.path, Publisher: pub,
				RetryMin: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond})
			const routed = rows - rows/10
			waitPublished(t, b.db, routed, 20*time.Second)
			time.Sleep(300 * time.Millisecond) // retries of the unroutable rows come and fail again
			require.NoError(t, stop())

			var marked, unrouted int
			require.NoError(t, b.db.QueryRow(`SELECT count(*) FROM warren_outbox WHERE published_at IS NOT NULL`).Scan(&marked))
			require.NoError(t, b.db.QueryRow(`SELECT count(*) FROM warren_outbox WHERE published_at IS NULL AND event_type = 'unrouted.event'`).Scan(&unrouted))
			require.Equal(t, routed, marked, "exactly the routed rows are marked")
			require.Equal(t, rows/10, unrouted, "the unroutable rows stay unpublished")
			ds := testenv.Consume(t, conn, queue, routed, 10*time.Second)
			seen := map[string]bool{}
			for _, d := range ds {
				require.False(t, seen[d.MessageId], "%s arrived twice", d.MessageId)
				seen[d.MessageId] = true
			}
			require.Len(t, seen, routed)

			calls, largest := rec.stats(path)
			require.Greater(t, largest, 1, "a backlog goes in batches, not a Router message per row")
			require.LessOrEqual(t, largest, relay.DefaultPublishBatch)
			t.Logf("%d rows in %d %s calls, the largest of %d rows", rows, calls, path, largest)
		})
	}
}

// recordingPublisher passes PublishPrepared and PublishEach calls on and
// records their sizes.
type recordingPublisher struct {
	*publisher.Publisher
	mu      sync.Mutex
	calls   map[string]int
	largest map[string]int
}

func (r *recordingPublisher) record(method string, n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.calls == nil {
		r.calls, r.largest = map[string]int{}, map[string]int{}
	}
	r.calls[method]++
	r.largest[method] = max(r.largest[method], n)
}

func (r *recordingPublisher) PublishPrepared(ctx context.Context, exchange string, pubs []publisher.Prepared) []error {
	r.record("PublishPrepared", len(pubs))
	return r.Publisher.PublishPrepared(ctx, exchange, pubs)
}

func (r *recordingPublisher) PublishEach(topic string, msgs ...*message.Message) []error {
	r.record("PublishEach", len(msgs))
	return r.Publisher.PublishEach(topic, msgs...)
}

func (r *recordingPublisher) stats(method string) (calls, largest int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls[method], r.largest[method]
}

// eachOnly is a Watermill publisher with PublishEach but not
// PublishPrepared.
type eachOnly struct{ r *recordingPublisher }

func (e eachOnly) Publish(topic string, msgs ...*message.Message) error {
	return e.r.Publish(topic, msgs...)
}

func (e eachOnly) PublishEach(topic string, msgs ...*message.Message) []error {
	return e.r.PublishEach(topic, msgs...)
}

func (e eachOnly) Close() error { return e.r.Close() }

// An application that gives its database one connection and embeds the
// relay on it: the relay's reader, marker and pruner take that connection
// in turn and never hold it between their statements, so everything is
// published and the application's own writes go through meanwhile.
func TestRelayOnAOneConnectionPool(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.db.SetMaxOpenConns(1)
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, b.exchange)
	start(t, relay.Config{DB: b.db, DBPath: b.path, Publisher: b.pub})
	ctx := context.Background()
	const rounds, per = 5, 200
	for round := range rounds {
		var evs []outbox.Event
		for i := range per {
			evs = append(evs, outbox.Event{Producer: b.producer, Type: "company.updated", AggregateID: fmt.Sprint(i % 10), Payload: []byte(`{}`)})
		}
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := outbox.AppendDB(wctx, b.db, evs...)
		cancel()
		require.NoError(t, err, "round %d: the application's write waited on the relay", round)
	}
	waitPublished(t, b.db, rounds*per, 20*time.Second)
	require.Len(t, testenv.Consume(t, conn, queue, rounds*per, 10*time.Second), rounds*per)
}
