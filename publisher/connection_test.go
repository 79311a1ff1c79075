package publisher_test

import (
	"context"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/publisher"
)

// freePort returns a local port nothing listens on.
func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	_, port, _ := net.SplitHostPort(l.Addr().String())
	require.NoError(t, l.Close())
	return port
}

// withPassword returns the broker URL with another password.
func withPassword(t testing.TB, raw, password string) string {
	u, err := url.Parse(raw)
	require.NoError(t, err)
	u.User = url.UserPassword(u.User.Username(), password)
	return u.String()
}

// withVhost returns the broker URL with another vhost.
func withVhost(t testing.TB, raw, vhost string) string {
	u, err := url.Parse(raw)
	require.NoError(t, err)
	u.Path = "/" + vhost
	return u.String()
}

func TestDialErrors(t *testing.T) {
	t.Parallel()
	newAdmin(t) // fails the test when no broker answers

	t.Run("refused port", func(t *testing.T) {
		t.Parallel()
		port := freePort(t)
		_, err := publisher.Dial(t.Context(), publisher.ConnectionConfig{URL: "amqp://guest:guest@127.0.0.1:" + port + "/"})
		require.ErrorIs(t, err, publisher.ErrUnreachable)
		require.Contains(t, err.Error(), "127.0.0.1:"+port)
		require.NotContains(t, err.Error(), "\n")
		t.Logf("error: %v", err)
	})

	t.Run("unknown host", func(t *testing.T) {
		t.Parallel()
		_, err := publisher.Dial(t.Context(), publisher.ConnectionConfig{URL: "amqp://guest:guest@no-such-host.invalid:5672/"})
		require.ErrorIs(t, err, publisher.ErrUnreachable)
		require.Contains(t, err.Error(), "no-such-host.invalid:5672")
		t.Logf("error: %v", err)
	})

	t.Run("wrong password", func(t *testing.T) {
		t.Parallel()
		const password = "s3cret-Wrong-pw"
		cfg := publisher.ConnectionConfig{URL: withPassword(t, brokerURL(), password)}
		_, err := publisher.Dial(t.Context(), cfg)
		require.ErrorIs(t, err, publisher.ErrAuth)
		require.Contains(t, err.Error(), "login refused for user")
		require.Contains(t, err.Error(), brokerHostPort(t))
		require.NotContains(t, err.Error(), password)
		t.Logf("error: %v", err)

		// The publisher's Connect fails the same way, at once.
		p := newPublisher(t, publisher.Config{Connection: cfg})
		err = p.Connect(t.Context())
		require.ErrorIs(t, err, publisher.ErrAuth)
		require.NotContains(t, err.Error(), password)
	})

	t.Run("missing vhost", func(t *testing.T) {
		t.Parallel()
		vhost := unique("no-vhost")
		_, err := publisher.Dial(t.Context(), publisher.ConnectionConfig{URL: withVhost(t, brokerURL(), vhost)})
		require.ErrorIs(t, err, publisher.ErrVhost)
		require.Contains(t, err.Error(), vhost)
		t.Logf("error: %v", err)
	})

	t.Run("bad scheme", func(t *testing.T) {
		t.Parallel()
		cfg := publisher.ConnectionConfig{URL: "http://guest:pw-in-url@localhost:5672/"}
		err := cfg.Validate()
		require.Error(t, err)
		require.Contains(t, err.Error(), "connection_string")
		require.Contains(t, err.Error(), `"http"`)
		require.NotContains(t, err.Error(), "pw-in-url")
		_, err = publisher.Dial(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("error: %v", err)
	})

	t.Run("TLS to a plain port", func(t *testing.T) {
		t.Parallel()
		u := strings.Replace(brokerURL(), "amqp://", "amqps://", 1)
		_, err := publisher.Dial(t.Context(), publisher.ConnectionConfig{URL: u, DialTimeout: 3 * time.Second})
		require.Error(t, err)
		require.NotContains(t, err.Error(), "guest:guest")
		t.Logf("error: %v", err)
	})

	t.Run("cancelled context", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		_, err := publisher.Dial(ctx, publisher.ConnectionConfig{URL: brokerURL()})
		require.ErrorIs(t, err, context.Canceled)
	})
}

func TestDialConnectionName(t *testing.T) {
	t.Parallel()
	name := unique("warren-conn")
	conn, err := publisher.Dial(t.Context(), publisher.ConnectionConfig{URL: brokerURL(), ConnectionName: name, Heartbeat: 3 * time.Second})
	require.NoError(t, err)
	defer conn.Close()
	require.False(t, conn.IsClosed())
	require.Equal(t, 3*time.Second, conn.Config.Heartbeat)

	cfg, err := publisher.ConnectionConfig{ConnectionName: name}.AMQPConfig()
	require.NoError(t, err)
	require.Equal(t, name, cfg.Properties["connection_name"])
	require.Equal(t, "/", cfg.Vhost)
	require.Equal(t, publisher.DefaultHeartbeat, cfg.Heartbeat)
	require.NotNil(t, cfg.Dial)
}

func TestRedactURL(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"amqp://guest:guest@localhost:5672/":           "amqp://guest:xxxxx@localhost:5672/",
		"amqps://u:p%40ss@host/vhost":                  "amqps://u:xxxxx@host/vhost",
		"amqp://localhost/":                            "amqp://localhost/",
		"amqp://user@localhost/":                       "amqp://user@localhost/",
		"amqp://u:pa ss@local host:bad/%zz":            "amqp://u:xxxxx@local host:bad/%zz",
		"amqp://guest:guest@localhost:5672/?heartbeat": "amqp://guest:xxxxx@localhost:5672/?heartbeat",
	} {
		require.Equal(t, want, publisher.RedactURL(in), in)
	}
}

func TestTopology(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	ctx := t.Context()

	producer := unique("topo")
	a.deleteExchangeAtEnd(publisher.ExchangeName(producer))
	err := publisher.VerifyExchange(ctx, a.conn, producer)
	require.ErrorIs(t, err, publisher.ErrExchangeMissing)
	require.Contains(t, err.Error(), publisher.ExchangeName(producer))
	require.Contains(t, err.Error(), "warren topology declare")

	require.NoError(t, publisher.DeclareExchange(ctx, a.conn, producer))
	require.NoError(t, publisher.DeclareExchange(ctx, a.conn, producer), "declaring twice is fine")
	require.NoError(t, publisher.VerifyExchange(ctx, a.conn, producer))

	// The wrong kind.
	wrong := unique("wrong")
	ch := a.channel()
	require.NoError(t, ch.ExchangeDeclare(publisher.ExchangeName(wrong), "direct", true, false, false, false, nil))
	a.deleteExchangeAtEnd(publisher.ExchangeName(wrong))
	err = publisher.VerifyExchange(ctx, a.conn, wrong)
	require.ErrorIs(t, err, publisher.ErrExchangeMismatch)
	t.Logf("error: %v", err)
	err = publisher.DeclareExchange(ctx, a.conn, wrong)
	require.ErrorIs(t, err, publisher.ErrExchangeMismatch)

	// Bad names never reach the broker.
	require.Error(t, publisher.DeclareExchange(ctx, a.conn, "Bad Name"))
	require.Error(t, publisher.VerifyExchange(ctx, a.conn, ""))

	// The connection survived all of that.
	require.False(t, a.conn.IsClosed())
}
