package broker_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/warrenmq/warren/test/broker"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const wait = 15 * time.Second

// TestNode runs every helper against one private node: a node costs about
// five seconds of CPU to start, and each step leaves the node as it was.
func TestNode(t *testing.T) {
	t.Parallel()
	n := broker.Start(t, broker.Options{})
	require.Equal(t, fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", n.Port), n.URL)
	require.True(t, strings.HasSuffix(n.Name, "@localhost"), n.Name)

	t.Run("PublishConsume", func(t *testing.T) {
		ch := channel(t, n.URL)
		q := tempQueue(t, ch)
		publish(t, ch, "", q, "hello")
		require.Equal(t, "hello", receive(t, ch, q))
	})

	t.Run("RestrictedUser", func(t *testing.T) {
		admin := channel(t, n.URL)
		require.NoError(t, admin.ExchangeDeclare("orders.events", "topic", false, true, false, false, nil))
		require.NoError(t, admin.ExchangeDeclare("payments.events", "topic", false, true, false, false, nil))
		secret := tempQueue(t, admin)

		require.NoError(t, n.AddUser("orders", "s3cret"))
		require.NoError(t, n.SetPermissions("orders", "/", "^$", `^orders\.events$`, "^$"))
		ch := channel(t, n.UserURL("orders", "s3cret", "/"))

		require.NoError(t, ch.Confirm(false))
		confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1))
		publish(t, ch, "orders.events", "order.created", "{}")
		select {
		case c := <-confirms:
			require.True(t, c.Ack, "publish to the permitted exchange is confirmed")
		case <-time.After(wait):
			t.Fatal("no confirm for a publish to the permitted exchange")
		}

		_, err := ch.Consume(secret, "", true, false, false, false, nil)
		requireAMQPError(t, err, amqp.AccessRefused)

		ch = channel(t, n.UserURL("orders", "s3cret", "/"))
		closed := ch.NotifyClose(make(chan *amqp.Error, 1))
		publish(t, ch, "payments.events", "payment.made", "{}")
		select {
		case err := <-closed:
			requireAMQPError(t, err, amqp.AccessRefused)
		case <-time.After(wait):
			t.Fatal("a publish to another exchange was not refused")
		}

		require.NoError(t, n.AddVhost("tenant"))
		require.False(t, broker.Answers(t.Context(), n.UserURL("orders", "s3cret", "tenant")), "no permission on the new vhost yet")
		require.NoError(t, n.SetPermissions("orders", "tenant", ".*", ".*", ".*"))
		require.True(t, broker.Answers(t.Context(), n.UserURL("orders", "s3cret", "tenant")))
	})

	t.Run("MemoryAlarmBlocksPublishers", func(t *testing.T) {
		conn := dial(t, n.URL)
		blocked := conn.NotifyBlocked(make(chan amqp.Blocking, 2))
		ch, err := conn.Channel()
		require.NoError(t, err)
		q := tempQueue(t, ch)
		require.NoError(t, ch.Confirm(false))
		confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1))

		require.NoError(t, n.SetMemoryAlarm(true))
		t.Cleanup(func() { n.SetMemoryAlarm(false) })
		publish(t, ch, "", q, "held back")
		select {
		case b := <-blocked:
			require.True(t, b.Active, "blocked: %s", b.Reason)
		case <-time.After(wait):
			t.Fatal("the connection was not blocked")
		}
		select {
		case <-confirms:
			t.Fatal("a publish was confirmed during the memory alarm")
		case <-time.After(500 * time.Millisecond):
		}

		require.NoError(t, n.SetMemoryAlarm(false))
		select {
		case b := <-blocked:
			require.False(t, b.Active)
		case <-time.After(wait):
			t.Fatal("the connection was not unblocked")
		}
		select {
		case c := <-confirms:
			require.True(t, c.Ack)
		case <-time.After(wait):
			t.Fatal("no confirm after the alarm cleared")
		}
	})

	t.Run("CloseAllConnections", func(t *testing.T) {
		conn := dial(t, n.URL)
		closed := conn.NotifyClose(make(chan *amqp.Error, 1))
		require.NoError(t, n.CloseAllConnections("warren test says bye"))
		select {
		case err := <-closed:
			requireAMQPError(t, err, amqp.ConnectionForced)
			require.Contains(t, err.Reason, "warren test says bye")
		case <-time.After(wait):
			t.Fatal("the connection was not closed")
		}
	})

	t.Run("StopAppStartApp", func(t *testing.T) {
		conn := dial(t, n.URL)
		closed := conn.NotifyClose(make(chan *amqp.Error, 1))
		require.NoError(t, n.StopApp())
		select {
		case <-closed:
		case <-time.After(wait):
			t.Fatal("stop_app did not close the connection")
		}
		require.False(t, broker.Answers(t.Context(), n.URL))
		require.NoError(t, n.StartApp())
		require.True(t, broker.Answers(t.Context(), n.URL))

		ch := channel(t, n.URL)
		q := tempQueue(t, ch)
		publish(t, ch, "", q, "again")
		require.Equal(t, "again", receive(t, ch, q))
	})

	t.Run("StopIsFinal", func(t *testing.T) {
		require.NoError(t, n.Stop())
		require.NoError(t, n.Stop(), "safe twice")
		require.False(t, n.Running())
		require.False(t, broker.Answers(t.Context(), n.URL))
	})
}

func TestEnsureStartsAndReusesANode(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	// A user and vhost other than guest and "/" are made on the new node.
	url := fmt.Sprintf("amqp://app:s3cret@localhost:%d/tenant", freePort(t))
	t.Cleanup(func() {
		if n, err := broker.Lookup(dir); err == nil {
			require.NoError(t, n.Stop())
		}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 2*broker.StartTimeout)
	defer cancel()
	require.False(t, broker.Answers(ctx, url))

	first, err := broker.EnsureNode(ctx, url, dir, logTo(t))
	require.NoError(t, err)
	require.Equal(t, url, first.URL)
	require.True(t, first.Started)
	require.True(t, broker.Answers(ctx, url))
	t.Logf("started %s in %v", first.Node.Name, first.Took)

	got, err := broker.Ensure(ctx, url, dir, logTo(t))
	require.NoError(t, err)
	require.Equal(t, url, got)
	n, err := broker.Lookup(dir)
	require.NoError(t, err)
	require.Equal(t, first.Node.PID, n.PID, "the second Ensure reused the node")

	// An answering URL is returned as it is and nothing is started for it.
	other := t.TempDir()
	again, err := broker.EnsureNode(ctx, url, other, logTo(t))
	require.NoError(t, err)
	require.Equal(t, broker.Ensured{URL: url}, again)
	entries, err := os.ReadDir(other)
	require.NoError(t, err)
	require.Empty(t, entries)

	// A node of ours found stopped is started again on the same data.
	require.NoError(t, n.Stop())
	_, err = broker.Lookup(dir)
	require.ErrorIs(t, err, broker.ErrNotRunning)
	restarted, err := broker.EnsureNode(ctx, url, dir, logTo(t))
	require.NoError(t, err)
	require.True(t, restarted.Started)
	require.Equal(t, first.Node.Name, restarted.Node.Name)
}

func TestEnsureUsesTheConfiguredBroker(t *testing.T) {
	t.Parallel()
	url := os.Getenv("WARREN_URL")
	if url == "" || !broker.Answers(t.Context(), url) {
		t.Skip("WARREN_URL is not set to a broker that answers (go tool task test sets it)")
	}
	dir := t.TempDir()
	got, err := broker.EnsureNode(t.Context(), url, dir, logTo(t))
	require.NoError(t, err)
	require.Equal(t, broker.Ensured{URL: url}, got)
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Empty(t, entries, "nothing was started")
}

func TestEnsureRefusesARemoteBrokerThatDoesNotAnswer(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	// 192.0.2.0/24 is reserved for documentation: nothing answers there.
	_, err := broker.Ensure(ctx, "amqp://app:hunter2@192.0.2.1:5672/", t.TempDir(), logTo(t))
	require.ErrorContains(t, err, "no broker answers at amqp://app:xxxxx@192.0.2.1:5672/")
	require.ErrorContains(t, err, "set WARREN_URL")
	require.NotContains(t, err.Error(), "hunter2")
}

func TestEnsureRefusesAPortTakenByAnotherProgram(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	go func() { // accepts and hangs up: not AMQP
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	url := fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", l.Addr().(*net.TCPAddr).Port)
	_, err = broker.Ensure(t.Context(), url, t.TempDir(), logTo(t))
	require.ErrorContains(t, err, "is taken, but no broker answers there")
}

// Not parallel: it sets environment variables.
func TestMissingServerSaysWhatToDo(t *testing.T) {
	t.Setenv(broker.ServerEnv, filepath.Join(t.TempDir(), "rabbitmq-server"))
	t.Setenv(broker.NoInstallEnv, "1")

	_, err := broker.StartNode(t.Context(), broker.Options{})
	require.ErrorIs(t, err, broker.ErrNotInstalled)

	url := fmt.Sprintf("amqp://guest:guest@localhost:%d/", freePort(t))
	_, err = broker.Ensure(t.Context(), url, t.TempDir(), logTo(t))
	require.ErrorIs(t, err, broker.ErrNotInstalled)
	t.Log(err)
	for _, want := range []string{"no broker answers at amqp://guest:xxxxx@localhost:", "WARREN_NO_INSTALL is set", "apt-get install -y rabbitmq-server", "set WARREN_URL"} {
		require.ErrorContains(t, err, want)
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func dial(t *testing.T, url string) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(url)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

func channel(t *testing.T, url string) *amqp.Channel {
	t.Helper()
	ch, err := dial(t, url).Channel()
	require.NoError(t, err)
	return ch
}

func tempQueue(t *testing.T, ch *amqp.Channel) string {
	t.Helper()
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	return q.Name
}

func publish(t *testing.T, ch *amqp.Channel, exchange, key, body string) {
	t.Helper()
	require.NoError(t, ch.PublishWithContext(t.Context(), exchange, key, false, false, amqp.Publishing{Body: []byte(body)}))
}

func receive(t *testing.T, ch *amqp.Channel, queue string) string {
	t.Helper()
	msgs, err := ch.Consume(queue, "", true, false, false, false, nil)
	require.NoError(t, err)
	select {
	case m := <-msgs:
		return string(m.Body)
	case <-time.After(wait):
		t.Fatalf("no message on %s", queue)
		return ""
	}
}

func requireAMQPError(t *testing.T, err error, code int) {
	t.Helper()
	var amqpErr *amqp.Error
	require.True(t, errors.As(err, &amqpErr), "want an AMQP error %d, got %v", code, err)
	require.Equal(t, code, amqpErr.Code, amqpErr.Error())
}

func logTo(t *testing.T) func(string) {
	return func(s string) { t.Log(s) }
}
