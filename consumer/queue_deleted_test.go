package consumer_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
)

// Deleting the queue under a running consumer makes the broker cancel its
// consumers; amqp091 closes their delivery channels and watermill-amqp
// reads zero deliveries from them. None of those may be parked as
// "malformed" messages: the consumer subscribes again (declaring the queue
// anew) and goes on.
func TestQueueDeletedUnderARunningConsumer(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.start(t, b.cfg, consumer.HandlerFunc(effect))
	b.publish(t, publisher.ExchangeName(b.producer), "company.updated", b.event("before"))
	require.Eventually(t, func() bool {
		return b.count(t, `SELECT count(*) FROM effects`) == 1
	}, 20*time.Second, 20*time.Millisecond)

	ch, err := b.conn.Channel()
	require.NoError(t, err)
	_, err = ch.QueueDelete(publisher.QueueName(b.name), false, false, false)
	require.NoError(t, err)
	_ = ch.Close()

	// The consumer declares its queue and binding again when it resubscribes.
	require.Eventually(t, func() bool {
		ch, err := b.conn.Channel()
		if err != nil {
			return false
		}
		defer ch.Close()
		q, err := ch.QueueDeclarePassive(publisher.QueueName(b.name), true, false, false, false, nil)
		return err == nil && q.Consumers > 0
	}, 30*time.Second, 100*time.Millisecond, "the consumer came back")
	b.publish(t, publisher.ExchangeName(b.producer), "company.updated", b.event("after"))
	require.Eventually(t, func() bool {
		return b.count(t, `SELECT count(*) FROM effects`) == 2
	}, 30*time.Second, 20*time.Millisecond)
	require.Zero(t, b.depth(t, publisher.PoisonQueueName(b.name)), "nothing was parked")
	require.Zero(t, b.counts.poisoned.Load())
}
