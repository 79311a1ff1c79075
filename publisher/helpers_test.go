package publisher_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/warrenmq/warren/publisher"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// toxiproxy v2.5.0 can leave a link's stub goroutine blocked on a
		// channel send after its proxy stopped; that is the test proxy's
		// leak, not the publisher's.
		goleak.IgnoreAnyFunction("github.com/Shopify/toxiproxy/v2/toxics.(*ToxicStub).Run"),
		goleak.IgnoreAnyFunction("github.com/Shopify/toxiproxy/v2.(*ToxicLink).read"),
		goleak.IgnoreAnyFunction("github.com/Shopify/toxiproxy/v2.(*ToxicLink).write"),
	)
}

// brokerURL is the shared broker: WARREN_URL or the default.
func brokerURL() string {
	if u := os.Getenv("WARREN_URL"); u != "" {
		return u
	}
	return publisher.DefaultURL
}

// brokerHostPort is the shared broker's host:port.
func brokerHostPort(t testing.TB) string {
	t.Helper()
	u, err := amqp.ParseURI(brokerURL())
	require.NoError(t, err)
	return u.Host + ":" + itoa(u.Port)
}

func itoa(n int) string {
	b := []byte{}
	if n == 0 {
		return "0"
	}
	for n > 0 {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
	}
	return string(b)
}

// unique returns prefix with a random suffix, a valid application name.
func unique(prefix string) string {
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	return prefix + "-" + hex.EncodeToString(b)
}

// testLogger writes the publisher's logs to the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(&tWriter{t: t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct {
	t  testing.TB
	mu sync.Mutex
}

func (w *tWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// discardLogger drops logs (benchmarks).
func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// admin is a connection of the test's own for setting up and inspecting
// topology on the shared broker.
type admin struct {
	t    testing.TB
	conn *amqp.Connection
}

// newAdmin connects to the shared broker; the test fails when no broker
// answers.
func newAdmin(t testing.TB) *admin {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := publisher.Dial(ctx, publisher.ConnectionConfig{URL: brokerURL(), ConnectionName: "warren-test-admin " + t.Name()})
	require.NoError(t, err, "the publisher tests need RabbitMQ at %s (set WARREN_URL)", publisher.RedactURL(brokerURL()))
	t.Cleanup(func() { _ = conn.Close() })
	return &admin{t: t, conn: conn}
}

// channel opens a channel closed at the end of the test.
func (a *admin) channel() *amqp.Channel {
	a.t.Helper()
	ch, err := a.conn.Channel()
	require.NoError(a.t, err)
	a.t.Cleanup(func() { _ = ch.Close() })
	return ch
}

// exchange declares a durable topic exchange deleted at the end of the test.
func (a *admin) exchange(name string) {
	a.t.Helper()
	ch := a.channel()
	require.NoError(a.t, ch.ExchangeDeclare(name, "topic", true, false, false, false, nil))
	a.deleteExchangeAtEnd(name)
}

func (a *admin) deleteExchangeAtEnd(name string) {
	a.t.Cleanup(func() {
		if ch, err := a.conn.Channel(); err == nil {
			_ = ch.ExchangeDelete(name, false, false)
			_ = ch.Close()
		}
	})
}

// queue declares a durable queue, bound to exchange with keys when exchange
// is not empty, and deleted at the end of the test.
func (a *admin) queue(name string, args amqp.Table, exchange string, keys ...string) {
	a.t.Helper()
	ch := a.channel()
	_, err := ch.QueueDeclare(name, true, false, false, false, args)
	require.NoError(a.t, err)
	a.t.Cleanup(func() {
		if ch, err := a.conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(name, false, false, false)
			_ = ch.Close()
		}
	})
	for _, k := range keys {
		require.NoError(a.t, ch.QueueBind(name, k, exchange, false, nil))
	}
}

// count is the number of ready messages in queue.
func (a *admin) count(queue string) int {
	a.t.Helper()
	ch, err := a.conn.Channel()
	require.NoError(a.t, err)
	defer ch.Close()
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	require.NoError(a.t, err)
	return q.Messages
}

// drain consumes every message of queue (auto-ack) and returns them.
func (a *admin) drain(queue string) []amqp.Delivery {
	a.t.Helper()
	want := a.count(queue)
	ch := a.channel()
	require.NoError(a.t, ch.Qos(1000, 0, false))
	deliveries, err := ch.Consume(queue, "", true, false, false, false, nil)
	require.NoError(a.t, err)
	var out []amqp.Delivery
	timeout := time.After(30 * time.Second)
	for len(out) < want {
		select {
		case d := <-deliveries:
			out = append(out, d)
		case <-timeout:
			a.t.Fatalf("drained %d of %d messages of %s", len(out), want, queue)
		}
	}
	return out
}

// newPublisher makes a publisher closed at the end of the test.
func newPublisher(t testing.TB, cfg publisher.Config) *publisher.Publisher {
	t.Helper()
	if cfg.Connection.URL == "" {
		cfg.Connection.URL = brokerURL()
	}
	if cfg.Connection.ConnectionName == "" {
		cfg.Connection.ConnectionName = "warren-test " + t.Name()
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	p, err := publisher.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, p.Close()) })
	return p
}

// event builds a message with every property of the contract.
func event(producer, eventType string) *message.Message {
	id := uuid.Must(uuid.NewV7()).String()
	m := message.NewMessage(id, []byte(`{"company":"acme","n":1}`))
	md := m.Metadata
	md.Set(publisher.MetaRoutingKey, eventType)
	md.Set(publisher.MetaType, eventType)
	md.Set(publisher.MetaAppID, producer)
	md.Set(publisher.MetaContentType, "application/json")
	md.Set(publisher.MetaTimestamp, time.Now().UTC().Format(time.RFC3339Nano))
	md.Set(publisher.MetaCorrelationID, "corr-"+id)
	md.Set(publisher.MetaExpiration, "3600000")
	md.Set(publisher.HeaderAggregateType, "company")
	md.Set(publisher.HeaderAggregateID, "42")
	md.Set(publisher.HeaderAggregateVersion, "7")
	md.Set(publisher.HeaderTraceparent, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	md.Set("tenant", "acme")
	return m
}
