package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/test/broker"
	"github.com/warrenmq/warren/test/proxy"
	"github.com/warrenmq/warren/test/testenv"
)

// pki is a certificate authority made for one test, with the files a
// broker and a client need.
type pki struct {
	dir    string
	caFile string
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
}

// randomSerial is a certificate serial number.
func randomSerial(t *testing.T) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	require.NoError(t, err)
	return n
}

func newPKI(t *testing.T, dir, name string) *pki {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(t),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	p := &pki{dir: dir, caFile: filepath.Join(dir, name+".pem"), caCert: cert, caKey: key}
	writePEM(t, p.caFile, "CERTIFICATE", der, 0o644)
	return p
}

// issue signs a leaf certificate for localhost and 127.0.0.1 and writes it
// and its key; it returns the two file names.
func (p *pki) issue(t *testing.T, name string, usage x509.ExtKeyUsage) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(t),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	require.NoError(t, err)
	keyDER, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	certFile = filepath.Join(p.dir, name+".pem")
	keyFile = filepath.Join(p.dir, name+".key")
	writePEM(t, certFile, "CERTIFICATE", der, 0o644)
	writePEM(t, keyFile, "EC PRIVATE KEY", keyDER, 0o600)
	return certFile, keyFile
}

func writePEM(t *testing.T, path, typ string, der []byte, perm os.FileMode) {
	t.Helper()
	require.NoError(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), perm))
}

// freeLocalPort returns a port of 127.0.0.1 that was free a moment ago.
func freeLocalPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startNode starts a private node and logs how long it took.
func startNode(t *testing.T, opts broker.Options) *broker.Node {
	t.Helper()
	start := time.Now()
	n := broker.Start(t, opts)
	t.Logf("private node %s started in %s", n.Name, time.Since(start).Round(time.Millisecond))
	return n
}

// TestAMQPSWithPrivateCA runs the relay over amqps against a node that
// verifies client certificates, with a CA made by the test.
func TestAMQPSWithPrivateCA(t *testing.T) {
	t.Parallel()
	certs := t.TempDir()
	require.NoError(t, os.Chmod(certs, 0o755))
	ca := newPKI(t, certs, "ca")
	serverCert, serverKey := ca.issue(t, "server", x509.ExtKeyUsageServerAuth)
	clientCert, clientKey := ca.issue(t, "client", x509.ExtKeyUsageClientAuth)
	otherCA := newPKI(t, certs, "other-ca")

	tlsPort := freeLocalPort(t)
	node := startNode(t, broker.Options{Config: fmt.Sprintf(`listeners.ssl.default = 127.0.0.1:%d
ssl_options.cacertfile = %s
ssl_options.certfile = %s
ssl_options.keyfile = %s
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
`, tlsPort, ca.caFile, serverCert, serverKey)})

	_, dbPath := testenv.DB(t)
	producer := testenv.Name("tls")
	conn := testenv.Conn(t, node.URL)
	queue := testenv.BindQueue(t, conn, publisher.ExchangeName(producer))

	tlsURL := fmt.Sprintf("amqps://guest:guest@localhost:%d/", tlsPort)
	env := []string{
		"WARREN_DB=" + dbPath,
		"WARREN_URL=" + tlsURL,
		"WARREN_TLS_CA_FILE=" + ca.caFile,
		"WARREN_TLS_CERT_FILE=" + clientCert,
		"WARREN_TLS_KEY_FILE=" + clientKey,
	}

	t.Run("publishes", func(t *testing.T) {
		out, code := runWarren(t, env, "", "outbox", "append", "--producer", producer, "--type", "secret.sent", `{"over":"tls"}`)
		require.Equal(t, 0, code, out)
		r := startWarren(t, env, "relay")
		ds := testenv.Consume(t, conn, queue, 1, 30*time.Second)
		require.Len(t, ds, 1, "the event reached the queue over amqps:\n%s", r.out.String())
		require.Equal(t, `{"over":"tls"}`, string(ds[0].Body))
		require.Equal(t, "secret.sent", ds[0].Type)

		// The relay's connection is TLS: the node lists it so.
		out, err := node.Ctl(t.Context(), "list_connections", "ssl", "--quiet", "--no-table-headers")
		require.NoError(t, err)
		require.Contains(t, strings.Fields(out), "true", "a TLS connection: %q", out)

		r.signal(syscall.SIGTERM)
		require.Equal(t, 0, r.wait(30*time.Second), r.out.String())
	})

	t.Run("wrong CA", func(t *testing.T) {
		bad := append([]string{}, env...)
		bad = append(bad, "WARREN_TLS_CA_FILE="+otherCA.caFile)
		oneLineError(t, bad, "", []string{"relay"}, "TLS verification", fmt.Sprintf("localhost:%d", tlsPort), "ca_file")
		oneLineError(t, bad, "", []string{"topology", "declare", "--producer", producer}, "TLS verification")
	})

	t.Run("no client certificate", func(t *testing.T) {
		noCert := []string{"WARREN_DB=" + dbPath, "WARREN_URL=" + tlsURL, "WARREN_TLS_CA_FILE=" + ca.caFile}
		// The broker's refusal races with the client's first write: the
		// alert is read, or the write meets a reset. Both name TLS and the
		// client certificate.
		for range 6 {
			oneLineError(t, noCert, "", []string{"relay"}, "TLS", fmt.Sprintf("localhost:%d", tlsPort), "cert_file")
		}
		out, _ := runWarren(t, noCert, "", "relay")
		t.Logf("without a client certificate: %s", strings.TrimSpace(out))
	})
}

// TestRelayLeastPrivilege runs the relay as a user that may only write to
// its producer's exchange, with declaring off.
func TestRelayLeastPrivilege(t *testing.T) {
	t.Parallel()
	node := startNode(t, broker.Options{})
	producer := testenv.Name("lp")
	exchange := publisher.ExchangeName(producer)
	admin := testenv.Conn(t, node.URL)
	queue := testenv.BindQueue(t, admin, exchange)

	require.NoError(t, node.AddUser("relay-user", "relay-pw"))
	write := "^" + strings.ReplaceAll(exchange, ".", `\.`) + "$"
	require.NoError(t, node.SetPermissions("relay-user", "/", "^$", write, "^$"))
	userURL := node.UserURL("relay-user", "relay-pw", "/")

	_, dbPath := testenv.DB(t)
	env := []string{"WARREN_DB=" + dbPath, "WARREN_URL=" + userURL}
	out, code := runWarren(t, env, "", "outbox", "append", "--producer", producer, "--type", "least.privilege", `{"n":1}`)
	require.Equal(t, 0, code, out)

	r := startWarren(t, env, "relay", "--declare=false")
	ds := testenv.Consume(t, admin, queue, 1, 30*time.Second)
	require.Len(t, ds, 1, "the event reached the queue:\n%s", r.out.String())
	require.Equal(t, "least.privilege", ds[0].Type)
	r.signal(syscall.SIGTERM)
	require.Equal(t, 0, r.wait(30*time.Second), r.out.String())
	require.NotContains(t, r.out.String(), "relay-pw")

	// Declaring on, for a producer whose exchange is missing and which the
	// user may not configure: a clear error about permissions, not a hang.
	other := testenv.Name("lp-missing")
	otherSQL, otherDB := testenv.DB(t)
	env = []string{"WARREN_DB=" + otherDB, "WARREN_URL=" + userURL}
	out, code = runWarren(t, env, "", "outbox", "append", "--producer", other, "--type", "least.privilege", `{"n":2}`)
	require.Equal(t, 0, code, out)
	r = startWarren(t, env, "relay")
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) && !mentionsPermissions(r.out.String()) {
		select {
		case <-r.done:
		case <-time.After(100 * time.Millisecond):
			continue
		}
		break
	}
	time.Sleep(2 * time.Second) // how often does it say so?
	got := r.out.String()
	t.Logf("relay with declaring on, exit %v, %d lines name ACCESS_REFUSED after 2s more:\n%s",
		r.cmd.ProcessState, strings.Count(got, "ACCESS_REFUSED"), firstLinesOf(got, 4))
	published, total := countPublished(t, otherSQL)
	require.Equal(t, 0, published, "nothing was published")
	require.Equal(t, 1, total)
	require.True(t, mentionsPermissions(got), "the relay should say that it may not declare %s:\n%s", publisher.ExchangeName(other), got)
	require.Contains(t, got, publisher.ExchangeName(other))
	require.NotContains(t, got, "relay-pw")
}

func firstLinesOf(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}

func mentionsPermissions(s string) bool {
	s = strings.ToLower(s)
	return strings.Contains(s, "access_refused") || strings.Contains(s, "access refused") || strings.Contains(s, "permission")
}

// TestPasswordsNeverPrinted runs the relay, a consumer and status with a
// password in the URL through a connection that is cut, and requires that
// the password appears in nothing they print or serve.
func TestPasswordsNeverPrinted(t *testing.T) {
	t.Parallel()
	const password = "s3cretpw"
	node := startNode(t, broker.Options{})
	require.NoError(t, node.AddUser("sec", password))
	require.NoError(t, node.SetPermissions("sec", "/", ".*", ".*", ".*"))
	px := proxy.Start(t, net.JoinHostPort(node.Host, strconv.Itoa(node.Port)))
	url := px.URL(node.UserURL("sec", password, "/"))

	_, dbPath := testenv.DB(t)
	producer := testenv.Name("pw")
	out, code := runWarren(t, []string{"WARREN_DB=" + dbPath}, "", "outbox", "append", "--producer", producer, "--type", "pw.checked", `{}`)
	require.Equal(t, 0, code, out)

	var printed []string
	check := func(what, s string) {
		t.Helper()
		printed = append(printed, s)
		require.NotContains(t, s, password, "%s shows the password:\n%s", what, s)
	}

	for _, format := range []string{"text", "json"} {
		metricsAddr := fmt.Sprintf("127.0.0.1:%d", freeLocalPort(t))
		relay := startWarren(t, nil, "relay", "--db", dbPath, "--url", url, "--log-level", "debug", "--log-format", format, "--metrics-addr", metricsAddr)
		consumerAddr := fmt.Sprintf("127.0.0.1:%d", freeLocalPort(t))
		_, inboxDB := testenv.DB(t)
		consume := startWarren(t, nil, "consume", "--db", inboxDB, "--url", url, "--app", testenv.Name("x"), "--from", producer,
			"--log-level", "debug", "--log-format", format, "--metrics-addr", consumerAddr)

		waitHTTP(t, "http://"+metricsAddr+"/readyz", 200, 30*time.Second)
		waitHTTP(t, "http://"+consumerAddr+"/readyz", 200, 30*time.Second)
		for _, addr := range []string{metricsAddr, consumerAddr} {
			for _, path := range []string{"/metrics", "/healthz", "/readyz"} {
				check(addr+path, httpGet(t, "http://"+addr+path))
			}
		}
		out, _ := runWarren(t, nil, "", "status", "--db", dbPath, "--url", url)
		check("status", out)
		out, _ = runWarren(t, nil, "", "status", "--db", dbPath, "--url", url, "--format", "json")
		check("status --format json", out)

		// Cut the broker away: both reconnect, with debug logs, and the
		// health endpoints and status say the broker is gone.
		px.Cut()
		waitHTTP(t, "http://"+metricsAddr+"/readyz", 503, 30*time.Second)
		waitHTTP(t, "http://"+consumerAddr+"/readyz", 503, 30*time.Second)
		time.Sleep(2 * time.Second) // a few reconnect attempts
		for _, addr := range []string{metricsAddr, consumerAddr} {
			for _, path := range []string{"/metrics", "/healthz", "/readyz"} {
				check(addr+path+" (cut)", httpGet(t, "http://"+addr+path))
			}
		}
		out, code := runWarren(t, nil, "", "status", "--db", dbPath, "--url", url)
		require.Equal(t, 1, code, out)
		check("status (cut)", out)
		out, _ = runWarren(t, nil, "", "relay", "--db", dbPath, "--url", url)
		check("relay start (cut)", out)
		px.Restore()

		relay.signal(syscall.SIGTERM)
		consume.signal(syscall.SIGTERM)
		relay.wait(30 * time.Second)
		consume.wait(30 * time.Second)
		check("relay "+format, relay.out.String())
		check("consume "+format, consume.out.String())
		require.NotEmpty(t, relay.out.String())
	}

	// The redacted URL shows up, so the lines did name the connection.
	all := strings.Join(printed, "\n")
	require.Contains(t, all, "sec:xxxxx@")
	t.Logf("checked %d KiB of output", len(all)/1024)
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b)
}

func waitHTTP(t *testing.T, url string, status int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	last := 0
	for time.Now().Before(deadline) {
		if resp, err := http.Get(url); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if last = resp.StatusCode; last == status {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s answered %d, not %d, within %s", url, last, status, d)
}
