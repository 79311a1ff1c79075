package publisher

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Connection defaults.
const (
	// DefaultURL is the broker URL used when none is given, per the contract.
	DefaultURL = "amqp://guest:guest@localhost:5672/"
	// DefaultHeartbeat is the AMQP heartbeat interval (consumer_heartbeat).
	DefaultHeartbeat = 10 * time.Second
	// DefaultTCPKeepAlive is the TCP keep-alive idle time (tcp_keepalive_timeout).
	DefaultTCPKeepAlive = 30 * time.Second
	// DefaultDialTimeout bounds the TCP connect and the TLS and AMQP handshakes.
	DefaultDialTimeout = 10 * time.Second
)

// Sentinel errors returned (wrapped) by Dial, for errors.Is.
var (
	// ErrUnreachable: no broker answered at the URL's host and port.
	ErrUnreachable = errors.New("broker unreachable")
	// ErrAuth: the broker refused the user name or password.
	ErrAuth = errors.New("broker refused the login")
	// ErrVhost: the virtual host does not exist or the user may not use it.
	ErrVhost = errors.New("broker refused the virtual host")
	// ErrTLS: the TLS handshake failed, typically because the server
	// certificate could not be verified.
	ErrTLS = errors.New("TLS handshake with the broker failed")
)

// redactedPassword replaces the password of a URL wherever it is shown.
const redactedPassword = "xxxxx"

// ConnectionConfig says how to reach RabbitMQ. It is shared by the relay's
// publisher and the consumer; AMQPConfig turns it into an amqp091 Config
// that watermill-amqp accepts as ConnectionConfig.AmqpConfig.
type ConnectionConfig struct {
	// URL is the broker (connection_string): amqp:// or amqps://, with the
	// user and password, and the vhost as its path ("/" or empty for the
	// default vhost "/", "/%2F" too, "/orders" for "orders"). Default
	// DefaultURL.
	URL string
	// CAFile is a PEM file of the certificate authorities that verify the
	// broker's certificate on amqps. Default: the system roots.
	CAFile string
	// CertFile and KeyFile are a PEM client certificate and its key, for
	// brokers that require client certificates. Default: none.
	CertFile string
	// KeyFile is the key of CertFile. Default: none.
	KeyFile string
	// ServerName overrides the name the broker's certificate must carry.
	// Default: the URL's host.
	ServerName string
	// Heartbeat is the AMQP heartbeat interval (consumer_heartbeat); a peer
	// that stays silent for about 1.5 heartbeats is considered gone. Zero
	// means DefaultHeartbeat (10s).
	Heartbeat time.Duration
	// TCPKeepAlive is the TCP keep-alive idle time (tcp_keepalive_timeout):
	// after this long without traffic the kernel probes the peer three times,
	// a third of it apart. Zero means DefaultTCPKeepAlive (30s).
	TCPKeepAlive time.Duration
	// DialTimeout bounds the TCP connect and the TLS and AMQP handshakes.
	// Zero means DefaultDialTimeout (10s).
	DialTimeout time.Duration
	// ConnectionName is the client-provided name rabbitmqctl
	// list_connections and the management UI show. Default: none.
	ConnectionName string
}

// WithDefaults returns a copy of c with every zero field set to its default.
func (c ConnectionConfig) WithDefaults() ConnectionConfig {
	if c.URL == "" {
		c.URL = DefaultURL
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = DefaultHeartbeat
	}
	if c.TCPKeepAlive == 0 {
		c.TCPKeepAlive = DefaultTCPKeepAlive
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	return c
}

// Validate checks c (after WithDefaults) and returns a plain-English error
// that names the setting at fault. It reads the TLS files.
func (c ConnectionConfig) Validate() error {
	c = c.WithDefaults()
	u, err := url.Parse(c.URL)
	if err != nil {
		return fmt.Errorf("broker URL (connection_string) %q is not a valid URL: use amqp://user:password@host:5672/vhost", RedactURL(c.URL))
	}
	if u.Scheme != "amqp" && u.Scheme != "amqps" {
		return fmt.Errorf("broker URL (connection_string) %q: scheme %q is not supported: use amqp:// or amqps://", RedactURL(c.URL), u.Scheme)
	}
	if _, err := amqp.ParseURI(c.URL); err != nil {
		return fmt.Errorf("broker URL (connection_string) %q is not a valid AMQP URL: %s", RedactURL(c.URL), redactText(err.Error(), c.URL))
	}
	if c.Heartbeat < 0 {
		return fmt.Errorf("heartbeat (consumer_heartbeat) is %s: it must not be negative", c.Heartbeat)
	}
	if c.Heartbeat > 0 && c.Heartbeat < time.Second {
		return fmt.Errorf("heartbeat (consumer_heartbeat) is %s: AMQP counts heartbeats in whole seconds, use at least 1s", c.Heartbeat)
	}
	if c.TCPKeepAlive < 0 {
		return fmt.Errorf("TCP keep-alive (tcp_keepalive_timeout) is %s: it must not be negative", c.TCPKeepAlive)
	}
	if c.DialTimeout < 0 {
		return fmt.Errorf("dial timeout is %s: it must not be negative", c.DialTimeout)
	}
	tlsFiles := c.CAFile != "" || c.CertFile != "" || c.KeyFile != ""
	if tlsFiles && u.Scheme != "amqps" {
		return fmt.Errorf("TLS files are set but the broker URL (connection_string) %q uses amqp://: use amqps:// to connect with TLS", RedactURL(c.URL))
	}
	if _, err := c.tlsConfig(u.Hostname()); err != nil {
		return err
	}
	return nil
}

// tlsConfig builds the TLS configuration for amqps from the files; nil
// without TLS settings on an amqp URL.
func (c ConnectionConfig) tlsConfig(host string) (*tls.Config, error) {
	if !strings.HasPrefix(c.URL, "amqps://") {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host}
	if c.ServerName != "" {
		cfg.ServerName = c.ServerName
	}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("TLS CA file (ca_file): cannot read %s: %w", c.CAFile, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("TLS CA file (ca_file) %s holds no PEM certificate", c.CAFile)
		}
		cfg.RootCAs = pool
	}
	switch {
	case c.CertFile != "" && c.KeyFile != "":
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("TLS client certificate (cert_file %s, key_file %s): %w", c.CertFile, c.KeyFile, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	case c.CertFile != "":
		return nil, fmt.Errorf("TLS client certificate (cert_file) %s is set without its key: set key_file too", c.CertFile)
	case c.KeyFile != "":
		return nil, fmt.Errorf("TLS client key (key_file) %s is set without its certificate: set cert_file too", c.KeyFile)
	}
	return cfg, nil
}

// AMQPConfig returns the amqp091 configuration for c: heartbeat, TLS, a
// dialer with the keep-alive and the dial timeout (which also bounds the
// handshakes), the vhost and the connection_name property. Use it with
// amqp.DialConfig(c.URL, cfg) or as watermill-amqp's
// ConnectionConfig.AmqpConfig (leave its TLSConfig nil).
func (c ConnectionConfig) AMQPConfig() (amqp.Config, error) {
	return c.amqpConfig(context.Background(), nil)
}

// amqpConfig builds the Config with a dialer bound to ctx. When onConn is not
// nil it receives the raw connection once dialed.
func (c ConnectionConfig) amqpConfig(ctx context.Context, onConn func(net.Conn)) (amqp.Config, error) {
	c = c.WithDefaults()
	if err := c.Validate(); err != nil {
		return amqp.Config{}, err
	}
	uri, err := amqp.ParseURI(c.URL)
	if err != nil {
		return amqp.Config{}, fmt.Errorf("broker URL (connection_string) %q: %s", RedactURL(c.URL), redactText(err.Error(), c.URL))
	}
	tlsCfg, err := c.tlsConfig(uri.Host)
	if err != nil {
		return amqp.Config{}, err
	}
	props := amqp.NewConnectionProperties()
	if c.ConnectionName != "" {
		props.SetClientConnectionName(c.ConnectionName)
	}
	ka := c.TCPKeepAlive
	interval := max(ka/3, time.Second)
	timeout := c.DialTimeout
	dialer := &net.Dialer{
		Timeout:         timeout,
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: ka, Interval: interval, Count: 3},
	}
	return amqp.Config{
		Vhost:           uri.Vhost,
		Heartbeat:       c.Heartbeat,
		TLSClientConfig: tlsCfg,
		Properties:      props,
		Locale:          "en_US",
		Dial: func(network, addr string) (net.Conn, error) {
			conn, err := dialer.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			// Bound the TLS and AMQP handshakes; amqp091 clears the
			// deadline once the connection is open.
			deadline := time.Now().Add(timeout)
			if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
				deadline = d
			}
			if err := conn.SetDeadline(deadline); err != nil {
				conn.Close()
				return nil, err
			}
			if onConn != nil {
				onConn(conn)
			}
			return newCoalescingConn(conn), nil
		},
	}, nil
}

// Dial connects to the broker described by c. ctx bounds the connect and
// the handshakes (as does c.DialTimeout). A failure is one line that names
// the host and port, never shows the password, and wraps ErrUnreachable,
// ErrAuth, ErrVhost or ErrTLS when it is one of those.
func Dial(ctx context.Context, c ConnectionConfig) (*amqp.Connection, error) {
	c = c.WithDefaults()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("connect to %s: %w", RedactURL(c.URL), err)
	}
	connCh := make(chan net.Conn, 1)
	cfg, err := c.amqpConfig(ctx, func(conn net.Conn) { connCh <- conn })
	if err != nil {
		return nil, err
	}
	// A cancelled ctx interrupts a handshake in progress.
	stop := context.AfterFunc(ctx, func() {
		select {
		case conn := <-connCh:
			_ = conn.SetDeadline(time.Unix(1, 0))
			connCh <- conn
		default:
		}
	})
	conn, err := amqp.DialConfig(c.URL, cfg)
	if !stop() && err == nil {
		// ctx ended while the handshake finished: the socket may carry a
		// past deadline now, so do not hand it out.
		_ = conn.Close()
		return nil, fmt.Errorf("connect to %s: %w", RedactURL(c.URL), ctx.Err())
	}
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w (%w)", ctx.Err(), err)
		}
		return nil, dialError(c, err)
	}
	return conn, nil
}

// DialError is a failed Dial. Its message is one line for operators; Kind
// is ErrUnreachable, ErrAuth, ErrVhost, ErrTLS or nil.
type DialError struct {
	URL  string // the broker URL, redacted
	Kind error  // ErrUnreachable, ErrAuth, ErrVhost, ErrTLS or nil
	Err  error  // the cause from the network, TLS or amqp091
	msg  string
}

// Error returns the one-line message.
func (e *DialError) Error() string { return e.msg }

// Unwrap returns the kind and the cause, for errors.Is and errors.As.
func (e *DialError) Unwrap() []error {
	if e.Kind == nil {
		return []error{e.Err}
	}
	return []error{e.Kind, e.Err}
}

func dialError(c ConnectionConfig, err error) error {
	uri, perr := amqp.ParseURI(c.URL)
	if perr != nil {
		return fmt.Errorf("connect to %s: %s", RedactURL(c.URL), redactText(err.Error(), c.URL))
	}
	hostPort := net.JoinHostPort(uri.Host, strconv.Itoa(uri.Port))
	cause := redactText(oneLine(err.Error()), c.URL)
	de := &DialError{URL: RedactURL(c.URL), Err: err}

	var amqpErr *amqp.Error
	var certErr *tls.CertificateVerificationError
	var unknownAuth x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var invalidCert x509.CertificateInvalidError
	var recordErr tls.RecordHeaderError
	var alertErr tls.AlertError
	var opErr *net.OpError
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, amqp.ErrCredentials) || errors.As(err, &amqpErr) && amqpErr.Code == amqp.AccessRefused && !errors.Is(err, amqp.ErrVhost):
		de.Kind = ErrAuth
		de.msg = fmt.Sprintf("login refused for user %q at %s: check the user name and password", uri.Username, hostPort)
	case errors.Is(err, amqp.ErrVhost) || errors.As(err, &amqpErr) && amqpErr.Code == amqp.NotAllowed && strings.Contains(strings.ToLower(amqpErr.Reason), "vhost"):
		de.Kind = ErrVhost
		de.msg = fmt.Sprintf(`virtual host %q at %s does not exist or user %q may not use it: create it (rabbitmqctl add_vhost %s) or grant access (rabbitmqctl set_permissions -p %s %s ".*" ".*" ".*")`,
			uri.Vhost, hostPort, uri.Username, uri.Vhost, uri.Vhost, uri.Username)
	case errors.As(err, &certErr), errors.As(err, &unknownAuth), errors.As(err, &hostErr), errors.As(err, &invalidCert):
		de.Kind = ErrTLS
		de.msg = fmt.Sprintf("TLS verification of the broker at %s failed: %s: check ca_file, server_name and the broker's certificate", hostPort, cause)
	case errors.As(err, &recordErr):
		de.Kind = ErrTLS
		de.msg = fmt.Sprintf("TLS handshake with %s failed: the port does not speak TLS (use amqp:// or the broker's TLS port, usually 5671)", hostPort)
	case errors.As(err, &dnsErr):
		de.Kind = ErrUnreachable
		de.msg = fmt.Sprintf("cannot reach the broker at %s: host %q not found", hostPort, uri.Host)
	case errors.Is(err, syscall.ECONNREFUSED):
		de.Kind = ErrUnreachable
		de.msg = fmt.Sprintf("cannot reach the broker at %s: connection refused (is RabbitMQ running and listening on that port?)", hostPort)
	case errors.As(err, &opErr) && opErr.Op == "dial":
		de.Kind = ErrUnreachable
		de.msg = fmt.Sprintf("cannot reach the broker at %s: %s", hostPort, cause)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		de.Kind = ErrUnreachable
		de.msg = fmt.Sprintf("cannot reach the broker at %s: no answer within the dial timeout (%s)", hostPort, c.WithDefaults().DialTimeout)
	case errors.As(err, &alertErr), errors.As(err, &amqpErr) && !amqpErr.Server && strings.HasPrefix(amqpErr.Reason, "remote error: tls:"):
		// The broker sent a TLS alert: during the handshake (TLS 1.2), or on
		// the first read after it (TLS 1.3, where amqp091 keeps only the
		// text), typically because it wants a client certificate.
		alert := amqpErr.Reason
		if errors.As(err, &alertErr) {
			alert = alertErr.Error()
		}
		de.Kind = ErrTLS
		de.msg = fmt.Sprintf("TLS handshake with %s was refused by the broker (%s): check cert_file and key_file: the broker may require a client certificate signed by a CA it trusts", hostPort, oneLine(alert))
	case uri.Scheme == "amqps" && (isReset(err, amqpErr) || errors.Is(err, amqp.ErrClosed)):
		// With TLS 1.3 a broker that refuses the client's certificate may
		// close the connection before its alert is read: the client then
		// sees a reset, or amqp091 only that the connection is closed. A
		// TLS server that is not RabbitMQ looks the same, so this is not
		// classed as ErrTLS; the line names both causes.
		de.msg = fmt.Sprintf("the TLS connection to %s was closed during the AMQP handshake (%s): if the broker requires a client certificate, check cert_file and key_file (signed by a CA it trusts); otherwise check that this is RabbitMQ's amqps port (5671)", hostPort, cause)
	case errors.As(err, &amqpErr) && !amqpErr.Server && amqpErr.Code == amqp.FrameError:
		de.msg = fmt.Sprintf("the connection to %s closed during the AMQP handshake (%s): check that this is RabbitMQ's AMQP port (5672, or 5671 for amqps)", hostPort, amqpErr.Reason)
	case errors.As(err, &amqpErr):
		de.msg = fmt.Sprintf("connect to the broker at %s: %s", hostPort, redactText(describeAMQPError(amqpErr), c.URL))
	default:
		de.msg = fmt.Sprintf("connect to the broker at %s: %s", hostPort, cause)
	}
	return de
}

// isReset tells whether err, or the amqp091 error that carries only its
// text, is a connection reset or a broken pipe.
func isReset(err error, amqpErr *amqp.Error) bool {
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return true
	}
	return amqpErr != nil && !amqpErr.Server &&
		(strings.HasSuffix(amqpErr.Reason, "connection reset by peer") || strings.HasSuffix(amqpErr.Reason, "broken pipe"))
}

// describeAMQPError renders an amqp091 error in one line: the broker's
// reply code and text, or the client-side reason.
func describeAMQPError(e *amqp.Error) string {
	if e.Server {
		return oneLine(fmt.Sprintf("the broker closed it with %d %s", e.Code, e.Reason))
	}
	return oneLine(e.Reason)
}

// RedactURL returns u with its password replaced by "xxxxx". Use it wherever
// a broker URL is logged or put in an error. A string that does not parse
// as a URL is returned with anything between "://" and "@" redacted.
func RedactURL(u string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		scheme, rest, ok := strings.Cut(u, "://")
		if !ok {
			return u
		}
		if at := strings.LastIndex(rest, "@"); at >= 0 {
			user, _, _ := strings.Cut(rest[:at], ":")
			return scheme + "://" + user + ":" + redactedPassword + rest[at:]
		}
		return u
	}
	if parsed.User == nil {
		return u
	}
	return parsed.Redacted() // the password becomes "xxxxx"
}

// redactText removes the URL's password from s.
func redactText(s, rawURL string) string {
	if parsed, err := url.Parse(rawURL); err == nil && parsed.User != nil {
		if pw, ok := parsed.User.Password(); ok && pw != "" {
			s = strings.ReplaceAll(s, rawURL, RedactURL(rawURL))
			s = strings.ReplaceAll(s, pw, redactedPassword)
		}
	}
	return s
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
