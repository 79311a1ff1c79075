package e2e

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"net/url"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/test/proxy"
	"github.com/warrenmq/warren/test/testenv"
)

// appendStream appends n events over aggs aggregates in transactions of 1
// to 50 events, pausing between them so the stream lasts about d. Each
// aggregate's events carry versions 0, 1, 2, ...
func appendStream(t *testing.T, db *sql.DB, producer string, n, aggs int, d time.Duration) <-chan error {
	done := make(chan error, 1)
	go func() {
		versions := make([]int64, aggs)
		perTx := 25
		pause := time.Duration(int64(d) * int64(perTx) / int64(n))
		for i := 0; i < n; {
			k := min(1+rand.IntN(2*perTx-1), n-i)
			evs := make([]outbox.Event, 0, k)
			for j := 0; j < k; j++ {
				a := rand.IntN(aggs)
				evs = append(evs, outbox.Event{Producer: producer, Type: "account.changed",
					AggregateType: "account", AggregateID: fmt.Sprint(a), AggregateVersion: outbox.Version(versions[a]),
					Payload: []byte(fmt.Sprintf(`{"n":%d}`, i+j))})
				versions[a]++
			}
			if _, err := outbox.AppendDB(context.Background(), db, evs...); err != nil {
				done <- err
				return
			}
			i += k
			time.Sleep(pause)
		}
		done <- nil
	}()
	return done
}

func countPublished(t *testing.T, db *sql.DB) (published, total int) {
	t.Helper()
	require.NoError(t, db.QueryRow(`SELECT count(published_at), count(*) FROM warren_outbox`).Scan(&published, &total))
	return
}

func waitAllPublished(t *testing.T, db *sql.DB, n int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		p, total := countPublished(t, db)
		if p == n && total == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d rows published after %s", p, total, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkQueue reads every message in queue and checks that each of the n
// events arrived at least once and that, per aggregate, the first arrivals
// are in version order. It returns the number of duplicates.
func checkQueue(t *testing.T, conn *amqp.Connection, queue string, n int) int {
	t.Helper()
	ds := testenv.Consume(t, conn, queue, 1<<30, 5*time.Second)
	seen := map[string]bool{}
	next := map[string]int64{}
	dups := 0
	for _, d := range ds {
		if seen[d.MessageId] {
			dups++
			continue
		}
		seen[d.MessageId] = true
		agg, _ := d.Headers["aggregate-id"].(string)
		v, _ := d.Headers["aggregate-version"].(int64)
		require.Equal(t, next[agg], v, "aggregate %s: first arrival of version %d, expected %d next", agg, v, next[agg])
		next[agg] = v + 1
	}
	require.Len(t, seen, n, "every event reached the queue")
	return dups
}

func TestRelaySurvivesKill9(t *testing.T) {
	t.Parallel()
	db, path := testenv.DB(t)
	producer := testenv.Name("kill9")
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, publisher.ExchangeName(producer))
	env := []string{"WARREN_DB=" + path, "WARREN_URL=" + testenv.URL(), "WARREN_LOG_LEVEL=warn"}

	const events, aggregates, kills = 20000, 100, 10
	appended := appendStream(t, db, producer, events, aggregates, 8*time.Second)

	r := startWarren(t, env, "relay")
	for k := 0; k < kills; k++ {
		time.Sleep(time.Duration(200+rand.IntN(600)) * time.Millisecond)
		r.kill()
		p, total := countPublished(t, db)
		t.Logf("kill %d: %d of %d appended rows published", k+1, p, total)
		r = startWarren(t, env, "relay")
	}
	require.NoError(t, <-appended)
	waitAllPublished(t, db, events, 60*time.Second)
	r.signal(syscall.SIGTERM)
	require.Equal(t, 0, r.wait(30*time.Second), r.out.String())

	dups := checkQueue(t, conn, queue, events)
	t.Logf("%d events over %d aggregates, %d kill -9s: every event arrived, per-aggregate order held, %d duplicates caused by the crashes", events, aggregates, kills, dups)
}

func TestStandbyRelayTakesOverAfterKill(t *testing.T) {
	t.Parallel()
	db, path := testenv.DB(t)
	producer := testenv.Name("standby")
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, publisher.ExchangeName(producer))
	env := []string{"WARREN_DB=" + path, "WARREN_URL=" + testenv.URL()}

	active := startWarren(t, env, "relay")
	active.waitOutput(t, "relay started", 20*time.Second)
	standby := startWarren(t, env, "relay")
	standby.waitOutput(t, "standby", 20*time.Second)
	require.NotContains(t, standby.out.String(), "relay started")

	_, err := outbox.AppendDB(context.Background(), db, outbox.Event{Producer: producer, Type: "t.one", Payload: []byte(`1`)})
	require.NoError(t, err)
	waitAllPublished(t, db, 1, 10*time.Second)

	active.kill()
	killedAt := time.Now()
	standby.waitOutput(t, "took over", 10*time.Second)
	t.Logf("standby took over %s after the active relay was killed", time.Since(killedAt).Round(time.Millisecond))
	_, err = outbox.AppendDB(context.Background(), db, outbox.Event{Producer: producer, Type: "t.two", Payload: []byte(`2`)})
	require.NoError(t, err)
	waitAllPublished(t, db, 2, 10*time.Second)
	require.Len(t, testenv.Consume(t, conn, queue, 2, 5*time.Second), 2)
}

func TestSigtermDrainsAndMarksEverythingConfirmed(t *testing.T) {
	t.Parallel()
	db, path := testenv.DB(t)
	producer := testenv.Name("sigterm")
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, publisher.ExchangeName(producer))

	const backlog = 20000
	for i := 0; i < backlog; i += 1000 {
		evs := make([]outbox.Event, 1000)
		for j := range evs {
			evs[j] = outbox.Event{Producer: producer, Type: "t", AggregateID: fmt.Sprint(j % 200), Payload: []byte(`{}`)}
		}
		_, err := outbox.AppendDB(context.Background(), db, evs...)
		require.NoError(t, err)
	}
	r := startWarren(t, []string{"WARREN_DB=" + path, "WARREN_URL=" + testenv.URL()}, "relay")
	deadline := time.Now().Add(30 * time.Second)
	for {
		p, _ := countPublished(t, db)
		if p >= 1000 {
			break
		}
		require.True(t, time.Now().Before(deadline), "relay did not start publishing")
		time.Sleep(5 * time.Millisecond)
	}
	r.signal(syscall.SIGTERM)
	require.Equal(t, 0, r.wait(30*time.Second), "SIGTERM exits 0:\n%s", r.out.String())
	require.Contains(t, r.out.String(), "relay stopped")

	published, _ := countPublished(t, db)
	ds := testenv.Consume(t, conn, queue, 1<<30, 3*time.Second)
	ids := map[string]bool{}
	for _, d := range ds {
		ids[d.MessageId] = true
	}
	t.Logf("stopped after %d of %d rows; %d distinct messages in the queue", published, backlog, len(ids))
	require.Equal(t, published, len(ids), "every confirmed message was marked before exit, and nothing else")
}

func TestRelayResumesAfterConnectionCuts(t *testing.T) {
	t.Parallel()
	db, path := testenv.DB(t)
	producer := testenv.Name("cuts")
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, publisher.ExchangeName(producer))
	u, err := url.Parse(testenv.URL())
	require.NoError(t, err)
	px := proxy.Start(t, u.Host)

	const events = 10000
	appended := appendStream(t, db, producer, events, 50, 6*time.Second)
	r := startWarren(t, []string{"WARREN_DB=" + path, "WARREN_URL=" + px.URL(testenv.URL()), "WARREN_HEARTBEAT=2s"}, "relay")
	for i := 0; i < 3; i++ {
		time.Sleep(1500 * time.Millisecond)
		px.Cut()
		time.Sleep(500 * time.Millisecond)
		px.Restore()
	}
	require.NoError(t, <-appended)
	waitAllPublished(t, db, events, 60*time.Second)
	r.signal(syscall.SIGTERM)
	require.Equal(t, 0, r.wait(30*time.Second), r.out.String())
	require.Contains(t, r.out.String(), "reconnect")
	dups := checkQueue(t, conn, queue, events)
	t.Logf("%d events through 3 connection cuts: all arrived in per-aggregate order, %d duplicates", events, dups)
}
