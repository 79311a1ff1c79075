// Package proxy runs an in-process toxiproxy TCP proxy in front of a broker
// so that a test can cut, stall and restore its own connections without
// touching the shared broker.
//
//	px := proxy.Start(t, "127.0.0.1:5672")
//	url := px.URL("amqp://guest:guest@127.0.0.1:5672/") // now via the proxy
//	px.Cut()     // closes every connection and refuses new ones
//	px.Restore() // accepts connections again
//	px.Stall()   // keeps connections open but lets no byte through
package proxy

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
)

// Proxy is one TCP proxy listening on a free port of 127.0.0.1.
type Proxy struct {
	// Addr is where the proxy listens, host:port.
	Addr string
	// Upstream is what it forwards to, host:port.
	Upstream string

	t       testing.TB // nil when made by New
	mu      sync.Mutex
	proxy   *toxiproxy.Proxy
	stalled bool
}

var nameSeq struct {
	sync.Mutex
	n int
}

// Start starts a proxy to upstream (host:port) on a free local port and
// stops it when the test ends.
func Start(t testing.TB, upstream string) *Proxy {
	t.Helper()
	p, err := New(upstream)
	if err != nil {
		t.Fatalf("start proxy to %s: %v", upstream, err)
	}
	p.t = t
	t.Cleanup(p.Close)
	return p
}

// New starts a proxy to upstream (host:port) on a free local port. Call
// Close when done.
func New(upstream string) (*Proxy, error) {
	nameSeq.Lock()
	nameSeq.n++
	name := fmt.Sprintf("proxy-%d", nameSeq.n)
	nameSeq.Unlock()

	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	px := toxiproxy.NewProxy(server, name, "127.0.0.1:0", upstream)
	if err := px.Start(); err != nil {
		return nil, err
	}
	return &Proxy{Addr: px.Listen, Upstream: upstream, proxy: px}, nil
}

// URL returns rawURL with its host and port replaced by the proxy's.
func (p *Proxy) URL(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		p.fail("proxy: bad URL: %v", err)
		return rawURL
	}
	u.Host = p.Addr
	return u.String()
}

// Cut closes every connection through the proxy and refuses new ones until
// Restore.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.proxy.Stop()
}

// Stall stops all traffic through the proxy, both ways, without closing
// the connections (the peers see silence, as with a dead network path).
// New connections are accepted but stalled too. Restore ends it.
func (p *Proxy) Stall() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stalled {
		return
	}
	for _, stream := range []string{"upstream", "downstream"} {
		body := fmt.Sprintf(`{"name":"stall_%s","type":"timeout","stream":%q,"toxicity":1,"attributes":{"timeout":0}}`, stream, stream)
		if _, err := p.proxy.Toxics.AddToxicJson(strings.NewReader(body)); err != nil {
			p.fail("proxy: add timeout toxic: %v", err)
			return
		}
	}
	p.stalled = true
}

// Restore removes a Stall and accepts connections again after a Cut.
// Connections that were stalled have lost bytes; the peers should drop them.
func (p *Proxy) Restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stalled {
		p.proxy.Toxics.ResetToxics(context.Background())
		p.stalled = false
	}
	if !p.proxy.Enabled {
		if err := p.proxy.Start(); err != nil {
			p.fail("proxy: restart on %s: %v", p.Addr, err)
		}
	}
}

// Close stops the proxy and closes its connections.
func (p *Proxy) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stalled {
		p.proxy.Toxics.ResetToxics(context.Background())
		p.stalled = false
	}
	p.proxy.Stop()
}

// fail reports a broken proxy to the test, or panics without one.
func (p *Proxy) fail(format string, args ...any) {
	if p.t != nil {
		p.t.Errorf(format, args...)
		return
	}
	panic(fmt.Sprintf(format, args...))
}

// Port returns the proxy's port.
func (p *Proxy) Port() string {
	_, port, _ := net.SplitHostPort(p.Addr)
	return port
}
