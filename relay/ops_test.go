package relay_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/relay"
	wsql "github.com/warrenmq/warren/sql"
	"github.com/warrenmq/warren/test/testenv"
)

func TestMetricsCountWhatTheRelayDoes(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	conn := testenv.Conn(t, testenv.URL())
	queue := testenv.BindQueue(t, conn, b.exchange, "order.placed")

	reg := prometheus.NewRegistry()
	m, err := relay.NewMetrics(reg, b.db)
	require.NoError(t, err)
	_, err = relay.NewMetrics(reg, b.db)
	require.Error(t, err, "a registry holds one set")
	pub := newPublisher(t, m.PublisherConfig(publisher.Config{}))

	var evs []outbox.Event
	for i := range 50 {
		typ := "order.placed"
		if i%5 == 0 {
			typ = "order.cancelled" // no queue is bound for it
		}
		evs = append(evs, outbox.Event{Producer: b.producer, Type: typ, AggregateID: fmt.Sprint(i % 7), Payload: []byte(`{}`)})
	}
	_, err = outbox.AppendDB(ctx, b.db, evs...)
	require.NoError(t, err)
	p := map[string]string{"producer": b.producer}
	backlog, ok := testenv.Metric(t, reg, "warren_outbox_backlog", p)
	require.True(t, ok)
	require.EqualValues(t, 50, backlog, "read from the database before the relay runs")
	time.Sleep(20 * time.Millisecond)
	age, _ := testenv.Metric(t, reg, "warren_outbox_oldest_unpublished_seconds", p)
	require.Greater(t, age, 0.0)

	stop := start(t, relay.Config{DB: b.db, DBPath: b.path, Publisher: pub, Metrics: m})
	waitPublished(t, b.db, 50, 20*time.Second)
	require.Eventually(t, func() bool {
		v, _ := testenv.Metric(t, reg, "warren_outbox_backlog", p)
		return v == 0
	}, 5*time.Second, 50*time.Millisecond, "refreshed at most once per %s", relay.BacklogRefresh)
	age, _ = testenv.Metric(t, reg, "warren_outbox_oldest_unpublished_seconds", p)
	require.Zero(t, age)

	published, _ := testenv.Metric(t, reg, "warren_relay_published_total", p)
	unroutable, _ := testenv.Metric(t, reg, "warren_relay_unroutable_total", p)
	confirms, _ := testenv.Metric(t, reg, "warren_relay_confirm_seconds", nil)
	require.EqualValues(t, 40, published)
	require.EqualValues(t, 10, unroutable)
	require.EqualValues(t, 40, confirms, "the confirms of routed events")
	require.Equal(t, 40, testenv.QueueDepth(t, conn, queue), "published_total is what reached a queue")

	handled, ok := testenv.Metric(t, reg, "watermill_handler_execution_time_seconds", map[string]string{"handler_name": "warren-relay", "success": "true"})
	require.True(t, ok, "Watermill's router metrics")
	// A Router message carries the rows ready at once, one per aggregate:
	// 50 rows of 7 aggregates take 8 messages at least, 50 at most.
	require.GreaterOrEqual(t, handled, 8.0)
	require.LessOrEqual(t, handled, 50.0)
	received, _ := testenv.Metric(t, reg, "watermill_subscriber_messages_received_total", map[string]string{"handler_name": "warren-relay", "acked": "acked"})
	require.Equal(t, handled, received)
	require.NoError(t, stop())
}

func TestReadyReportsTheDatabaseAndTheBroker(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	r, err := relay.New(relay.Config{DB: b.db, DBPath: b.path, Publisher: b.pub, ProbeWait: 100 * time.Millisecond})
	require.NoError(t, err)
	require.NoError(t, r.Ready(ctx))

	other, err := wsql.Open(ctx, b.path, wsql.Options{})
	require.NoError(t, err)
	defer other.Close()
	tx, err := other.BeginTx(ctx, nil) // holds the write lock
	require.NoError(t, err)
	err = r.Ready(ctx)
	require.ErrorContains(t, err, "write lock")
	require.NoError(t, tx.Rollback())
	require.NoError(t, r.Ready(ctx))

	require.NoError(t, b.pub.Close())
	require.ErrorIs(t, r.Ready(ctx), publisher.ErrClosed)
}

func TestRelayPrunesPublishedRowsOlderThanTheRetention(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.db.Exec(`INSERT INTO warren_outbox (event_id, producer, event_type, payload, created_at, published_at) VALUES
		('old-1', ?, 'x.y', '{}', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.000Z'),
		('old-2', ?, 'x.y', '{}', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.000Z'),
		('unpublished-old', ?, 'x.y', '{}', '2026-01-01T00:00:00.000Z', NULL)`, b.producer, b.producer, b.producer)
	require.NoError(t, err)
	_, err = outbox.AppendDB(ctx, b.db, outbox.Event{Producer: b.producer, Type: "x.y", Payload: []byte(`{}`)})
	require.NoError(t, err)
	conn := testenv.Conn(t, testenv.URL())
	testenv.BindQueue(t, conn, b.exchange)

	stop := start(t, relay.Config{DB: b.db, DBPath: b.path, Publisher: b.pub, Retention: 24 * time.Hour})
	waitPublished(t, b.db, 2, 20*time.Second) // the old unpublished row and the new one are published
	require.Eventually(t, func() bool {
		var n int
		require.NoError(t, b.db.QueryRow(`SELECT count(*) FROM warren_outbox`).Scan(&n))
		return n == 2
	}, 10*time.Second, 20*time.Millisecond, "only rows published within the retention are kept")
	var ids []string
	rows, err := b.db.Query(`SELECT event_id FROM warren_outbox ORDER BY seq`)
	require.NoError(t, err)
	for rows.Next() {
		var id string
		require.NoError(t, rows.Scan(&id))
		ids = append(ids, id)
	}
	require.NoError(t, rows.Err())
	require.Equal(t, "unpublished-old", ids[0], "an unpublished row is never pruned; published now, it is kept")
	require.NoError(t, stop())
}
