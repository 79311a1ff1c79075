package testenv

import (
	"context"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Conn dials url and closes the connection when the test ends.
func Conn(t testing.TB, url string) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatalf("dial test broker %s: %v (start one with `go tool task test`, which starts a private node when none answers)", url, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// BindQueue declares a durable topic exchange and a fresh queue bound to it
// with keys (default "#"), and deletes both when the test ends. It returns
// the queue name.
func BindQueue(t testing.TB, conn *amqp.Connection, exchange string, keys ...string) string {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	defer ch.Close()
	if err := ch.ExchangeDeclare(exchange, "topic", true, false, false, false, nil); err != nil {
		t.Fatalf("declare exchange %s: %v", exchange, err)
	}
	q := Name("q")
	if _, err := ch.QueueDeclare(q, true, false, false, false, nil); err != nil {
		t.Fatalf("declare queue %s: %v", q, err)
	}
	if len(keys) == 0 {
		keys = []string{"#"}
	}
	for _, k := range keys {
		if err := ch.QueueBind(q, k, exchange, false, nil); err != nil {
			t.Fatalf("bind %s: %v", q, err)
		}
	}
	t.Cleanup(func() { DeleteTopology(conn.LocalAddr().String(), conn, []string{exchange}, []string{q}) })
	return q
}

// DeleteTopology deletes exchanges and queues, ignoring what is gone.
func DeleteTopology(_ string, conn *amqp.Connection, exchanges, queues []string) {
	for _, q := range queues {
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(q, false, false, false)
			_ = ch.Close()
		}
	}
	for _, e := range exchanges {
		if ch, err := conn.Channel(); err == nil {
			_ = ch.ExchangeDelete(e, false, false)
			_ = ch.Close()
		}
	}
}

// Consume reads deliveries from queue (acking them) until n arrived or
// timeout passed, and returns them in arrival order.
func Consume(t testing.TB, conn *amqp.Connection, queue string, n int, timeout time.Duration) []amqp.Delivery {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	defer ch.Close()
	if err := ch.Qos(1000, 0, false); err != nil {
		t.Fatalf("qos: %v", err)
	}
	ds, err := ch.Consume(queue, "", false, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", queue, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out []amqp.Delivery
	for len(out) < n {
		select {
		case d, ok := <-ds:
			if !ok {
				return out
			}
			_ = d.Ack(false)
			out = append(out, d)
		case <-ctx.Done():
			return out
		}
	}
	return out
}

// QueueDepth returns the number of ready messages in queue.
func QueueDepth(t testing.TB, conn *amqp.Connection, queue string) int {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	defer ch.Close()
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		t.Fatalf("inspect queue %s: %v", queue, err)
	}
	return q.Messages
}
