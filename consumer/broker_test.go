package consumer_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/test/broker"
	"github.com/warrenmq/warren/test/testenv"
)

// onPrivateNode points b at a private broker node of its own.
func onPrivateNode(t *testing.T, b *testBundle) *broker.Node {
	t.Helper()
	n := broker.Start(t, broker.Options{})
	b.conn = testenv.Conn(t, n.URL)
	b.cfg.Connection = publisher.ConnectionConfig{URL: n.URL}
	return n
}

func TestBrokerTroubleLosesNothing(t *testing.T) {
	t.Parallel()
	b := setup(t)
	node := onPrivateNode(t, b)
	const n = 5000
	cfg := b.cfg
	cfg.Concurrency = 8
	b.start(t, cfg, consumer.HandlerFunc(effect))
	evs := make([]amqp.Publishing, n)
	for i := range evs {
		evs[i] = b.event(fmt.Sprintf("id-%05d", i))
	}
	b.publish(t, "", publisher.QueueName(b.name), evs...)

	processed := func() int { return b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'processed'`) }
	require.Eventually(t, func() bool { return processed() >= n/5 }, time.Minute, 5*time.Millisecond)
	require.NoError(t, node.CloseAllConnections("test: cut every client"))
	t.Logf("connections cut after %d processed", processed())

	require.Eventually(t, func() bool { return processed() >= n/2 }, time.Minute, 5*time.Millisecond)
	require.NoError(t, node.StopApp())
	t.Logf("broker stopped after %d processed", processed())
	time.Sleep(time.Second)
	require.NoError(t, node.StartApp())
	b.conn = testenv.Conn(t, node.URL)

	require.Eventually(t, func() bool { return processed() == n }, 2*time.Minute, 20*time.Millisecond,
		"processed %d of %d", processed(), n)
	require.Equal(t, n, b.count(t, `SELECT count(*) FROM effects`), "one effect per event")
	require.Equal(t, n, b.count(t, `SELECT count(DISTINCT message_id) FROM effects`))
	require.Zero(t, b.counts.poisoned.Load())
	require.Zero(t, b.counts.retried.Load())
	require.Eventually(t, func() bool { return b.depth(t, publisher.QueueName(b.name)) == 0 }, 10*time.Second, 20*time.Millisecond)
	t.Logf("%d duplicate deliveries absorbed", b.counts.duplicates.Load())
}

func TestLeastPrivilegeUserOnlyVerifies(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	node := onPrivateNode(t, b)
	require.NoError(t, node.AddUser("reader", "secret"))
	require.NoError(t, node.SetPermissions("reader", "/", "^$", ".*", ".*")) // may not declare anything
	restricted := b.cfg
	restricted.Connection = publisher.ConnectionConfig{URL: node.UserURL("reader", "secret", "/")}

	// Declaring needs rights this user lacks; the error says so.
	c, err := consumer.New(restricted, consumer.HandlerFunc(effect))
	require.NoError(t, err)
	err = c.Start(ctx)
	require.Error(t, err)
	require.Contains(t, err.Error(), "ACCESS_REFUSED")

	// Once an operator declared the topology, verifying is enough.
	require.NoError(t, consumer.DeclareTopology(ctx, b.conn, b.cfg))
	restricted.NoDeclare = true
	b.start(t, restricted, consumer.HandlerFunc(effect))
	b.publish(t, publisher.ExchangeName(b.producer), "company.updated", b.event("x"))
	require.Eventually(t, func() bool { return b.count(t, `SELECT count(*) FROM effects`) == 1 }, 10*time.Second, 10*time.Millisecond)
}
