package publisher

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is one readiness check of OpsHandler: Run returns nil when the
// component named Name is ready, else why not.
type Check struct {
	Name string
	Run  func(ctx context.Context) error
}

// Defaults of OpsHandler.
const (
	// DefaultCheckTimeout bounds one round of readiness checks.
	DefaultCheckTimeout = 3 * time.Second
	// DefaultCheckCache is how long a round's answer is reused, so that
	// frequent probes do not probe the database and broker each time.
	DefaultCheckCache = time.Second
)

// OpsHandler returns the operations endpoint that `warren relay` and
// `warren consume` serve on --metrics-addr, for applications that embed a
// relay or a consumer to serve on their own address:
//
//	/metrics  Prometheus metrics gathered from g (text format); a collector
//	          that fails is logged and left out, the others are served
//	/healthz  200 "ok" while the process serves HTTP
//	/readyz   200 when every check passes, else 503; one line per check
//
// The checks run concurrently, within DefaultCheckTimeout, and their
// answer is reused for DefaultCheckCache. log receives the metrics errors
// (nil: slog.Default()).
func OpsHandler(g prometheus.Gatherer, log *slog.Logger, checks ...Check) http.Handler {
	if log == nil {
		log = slog.Default()
	}
	rc := &readiness{checks: checks}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		ErrorLog:      slogPrinter{log},
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ok, lines := rc.run(r.Context())
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		for _, l := range lines {
			fmt.Fprintln(w, l)
		}
	})
	return mux
}

type readiness struct {
	checks []Check

	mu    sync.Mutex // one round at a time; others wait for its answer
	at    time.Time
	ok    bool
	lines []string
}

func (rc *readiness) run(ctx context.Context) (bool, []string) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if !rc.at.IsZero() && time.Since(rc.at) < DefaultCheckCache {
		return rc.ok, rc.lines
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), DefaultCheckTimeout)
	defer cancel()
	errs := make([]error, len(rc.checks))
	var wg sync.WaitGroup
	for i, c := range rc.checks {
		wg.Go(func() { errs[i] = c.Run(ctx) })
	}
	wg.Wait()
	ok := true
	lines := make([]string, 0, len(rc.checks)+1)
	for i, c := range rc.checks {
		if errs[i] != nil {
			ok = false
			lines = append(lines, c.Name+": "+oneLine(strings.ReplaceAll(errs[i].Error(), "\n", "; ")))
		} else {
			lines = append(lines, c.Name+": ok")
		}
	}
	if len(rc.checks) == 0 {
		lines = append(lines, "ok")
	}
	rc.at, rc.ok, rc.lines = time.Now(), ok, lines
	return ok, lines
}

// slogPrinter is promhttp's error log on a slog.Logger.
type slogPrinter struct{ l *slog.Logger }

func (p slogPrinter) Println(v ...any) {
	p.l.Warn("metrics: " + strings.TrimSpace(fmt.Sprintln(v...)))
}

// Ready returns nil while a connection to the broker is up, else why not
// (with the last failed connection attempt, if any). A relay's Ready and
// a consumer's Ready use it.
func (p *Publisher) Ready() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed:
		return fmt.Errorf("broker %s: %w", p.url, ErrClosed)
	case p.sess != nil && !p.sess.isDead():
		return nil
	case p.lastErr != nil:
		return fmt.Errorf("not connected to the broker: %w", p.lastErr)
	}
	return fmt.Errorf("not connected to the broker %s", p.url)
}
