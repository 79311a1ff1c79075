package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/warrenmq/warren/publisher"
)

// newRegistry returns a registry with the Go runtime's and the process's
// collectors.
func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// listenOps listens on the metrics address, so that a wrong one fails the
// command before it connects to anything; "" listens nowhere.
func listenOps(addr string) (net.Listener, error) {
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics address (--metrics-addr, WARREN_METRICS_ADDR): %w", err)
	}
	return ln, nil
}

// serveOps serves /metrics, /healthz and /readyz on ln until the returned
// stop is called; a nil ln serves nothing.
func serveOps(ln net.Listener, log *slog.Logger, reg prometheus.Gatherer, checks ...publisher.Check) (stop func()) {
	if ln == nil {
		return func() {}
	}
	srv := &http.Server{
		Handler:           publisher.OpsHandler(reg, log, checks...),
		ReadHeaderTimeout: 5 * time.Second,
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "addr", ln.Addr().String(), "error", err)
		}
	}()
	log.Info("serving /metrics, /healthz and /readyz", "addr", ln.Addr().String())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	}
}

// retentionOf maps a command-line retention (0 = forever) to the library's
// (negative = forever).
func retentionOf(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}
