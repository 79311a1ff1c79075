package publisher_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/test/broker"
)

// TestMemoryAlarmBlocksInsteadOfFailing raises the memory alarm of a
// private node: a publish waits, beyond ConfirmTimeout, for the alarm to
// clear and then succeeds, on the same connection.
func TestMemoryAlarmBlocksInsteadOfFailing(t *testing.T) {
	t.Parallel()
	n := broker.Start(t, broker.Options{})

	const confirmTimeout = 2 * time.Second
	p := newPublisher(t, publisher.Config{
		Connection:     publisher.ConnectionConfig{URL: n.URL},
		ConfirmTimeout: confirmTimeout,
	})
	producer := unique("alarm")
	exchange := publisher.ExchangeName(producer)
	require.NoError(t, p.Publish(exchange, event(producer, "company.created"))) // declares the exchange

	conn, err := publisher.Dial(t.Context(), publisher.ConnectionConfig{URL: n.URL})
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	ch, err := conn.Channel()
	require.NoError(t, err)
	queue := unique("q")
	_, err = ch.QueueDeclare(queue, true, false, false, false, nil)
	require.NoError(t, err)
	require.NoError(t, ch.QueueBind(queue, "#", exchange, false, nil))

	require.NoError(t, n.SetMemoryAlarm(true))
	t.Cleanup(func() { _ = n.SetMemoryAlarm(false) })
	start := time.Now()
	errc := make(chan error, 1)
	go func() { errc <- p.Publish(exchange, event(producer, "company.updated")) }()

	require.Eventually(t, func() bool { return p.Stats().Blocked }, 5*time.Second, 20*time.Millisecond,
		"the broker did not block the connection")
	const hold = 6 * time.Second
	select {
	case err := <-errc:
		t.Fatalf("Publish returned after %s while the broker blocked the connection: %v", time.Since(start), err)
	case <-time.After(hold - time.Since(start)):
	}

	require.NoError(t, n.SetMemoryAlarm(false))
	select {
	case err := <-errc:
		require.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("Publish did not return after the alarm cleared")
	}
	took := time.Since(start)
	t.Logf("the publish waited %s (confirm timeout %s) and succeeded", took.Round(time.Millisecond), confirmTimeout)
	require.Greater(t, took, 3*confirmTimeout)
	st := p.Stats()
	require.EqualValues(t, 1, st.Connects, "the connection was kept")
	require.False(t, st.Blocked)
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	require.NoError(t, err)
	require.Equal(t, 1, q.Messages)
}
