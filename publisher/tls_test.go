package publisher_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/publisher"
)

// tlsServer listens with a self-signed certificate for "warren-test" and
// completes TLS handshakes, then hangs up (it speaks no AMQP). It returns
// its address and the certificate's PEM file.
func tlsServer(t *testing.T) (addr, caFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "warren-test"},
		DNSNames:              []string{"warren-test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	caFile = filepath.Join(t.TempDir(), "ca.pem")
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))

	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
	})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			_ = c.Close()
		}
	}()
	t.Cleanup(func() { _ = l.Close(); <-done })
	return l.Addr().String(), caFile
}

func TestDialTLS(t *testing.T) {
	t.Parallel()
	addr, caFile := tlsServer(t)
	_, port, _ := net.SplitHostPort(addr)
	url := "amqps://guest:tls-pw@127.0.0.1:" + port + "/"

	// The system roots do not know the self-signed certificate.
	_, err := publisher.Dial(t.Context(), publisher.ConnectionConfig{URL: url, DialTimeout: 3 * time.Second})
	require.ErrorIs(t, err, publisher.ErrTLS)
	require.Contains(t, err.Error(), addr)
	require.NotContains(t, err.Error(), "tls-pw")
	t.Logf("error: %v", err)

	// The right CA, the wrong name.
	_, err = publisher.Dial(t.Context(), publisher.ConnectionConfig{URL: url, CAFile: caFile, DialTimeout: 3 * time.Second})
	require.ErrorIs(t, err, publisher.ErrTLS)
	t.Logf("error: %v", err)

	// The right CA and name: TLS passes, then the server hangs up.
	_, err = publisher.Dial(t.Context(), publisher.ConnectionConfig{URL: url, CAFile: caFile, ServerName: "warren-test", DialTimeout: 3 * time.Second})
	require.Error(t, err)
	require.NotErrorIs(t, err, publisher.ErrTLS)
	t.Logf("error: %v", err)

	// The configuration is what watermill-amqp would get.
	cfg, err := publisher.ConnectionConfig{URL: url, CAFile: caFile, ServerName: "warren-test"}.AMQPConfig()
	require.NoError(t, err)
	require.NotNil(t, cfg.TLSClientConfig)
	require.Equal(t, "warren-test", cfg.TLSClientConfig.ServerName)
	require.NotNil(t, cfg.TLSClientConfig.RootCAs)
}
