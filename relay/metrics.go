package relay

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"sync"
	"time"

	wmetrics "github.com/ThreeDotsLabs/watermill/components/metrics"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
)

// Defaults of the backlog gauges.
const (
	// BacklogRefresh is the least time between two reads of the outbox
	// for the backlog gauges: scrapes closer together get the last read
	// (the oldest-unpublished age still counts up).
	BacklogRefresh = time.Second
	// BacklogTimeout bounds one read of the outbox for the backlog gauges.
	BacklogTimeout = 5 * time.Second
)

// ConfirmBuckets are the buckets of warren_relay_confirm_seconds.
var ConfirmBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

// Metrics are the relay's Prometheus metrics, with the names and labels
// the contract fixes:
//
//	warren_outbox_backlog{producer}                    rows not yet published
//	warren_outbox_oldest_unpublished_seconds{producer} age of the oldest of them
//	warren_relay_published_total{producer}             confirmed by the broker and routed
//	warren_relay_unroutable_total{producer}            returned by the broker as unroutable
//	warren_relay_confirm_seconds                       publish to confirm (of routed events)
//
// The two outbox gauges are read from the database when scraped (at most
// once per BacklogRefresh) with outbox.Backlog, which reads only the
// partial index of unpublished rows; a producer stays listed, at 0, once
// it was seen. The counters and the histogram count what the publisher
// reports: build its configuration with PublisherConfig. Given to a relay
// in Config.Metrics, they also get Watermill's router metrics for the
// relay's router (watermill_handler_execution_time_seconds and
// watermill_subscriber_messages_received_total, handler "warren-relay";
// the handler time is publish to confirm, as the relay's handler waits
// for the confirm).
//
// A Metrics may serve several relays and publishers of one process.
type Metrics struct {
	published  *prometheus.CounterVec
	unroutable *prometheus.CounterVec
	confirm    prometheus.Histogram
	backlog    *backlogCollector // nil without a database
	router     routerMetrics
}

// NewMetrics registers the relay's metrics on reg and returns them. db is
// the database whose outbox the backlog gauges read; nil leaves those
// gauges out. It fails when reg holds other metrics of the same names.
func NewMetrics(reg prometheus.Registerer, db *sql.DB) (*Metrics, error) {
	m := &Metrics{
		published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "warren_relay_published_total",
			Help: "Outbox events the broker confirmed and routed to at least one queue.",
		}, []string{"producer"}),
		unroutable: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "warren_relay_unroutable_total",
			Help: "Outbox events the broker returned because no queue is bound for their routing key.",
		}, []string{"producer"}),
		confirm: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "warren_relay_confirm_seconds",
			Help:    "Time from publishing an event to the broker's confirm (events routed to a queue).",
			Buckets: ConfirmBuckets,
		}),
	}
	cs := []prometheus.Collector{m.published, m.unroutable, m.confirm}
	if db != nil {
		m.backlog = newBacklogCollector(db)
		cs = append(cs, m.backlog)
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("relay metrics: %w", err)
		}
	}
	r, err := newRouterMetrics(reg, nil)
	if err != nil {
		return nil, fmt.Errorf("relay metrics: %w", err)
	}
	m.router = r
	return m, nil
}

// PublisherConfig returns c with OnConfirmed and OnUnroutable set to count
// into m, calling the hooks c had too.
func (m *Metrics) PublisherConfig(c publisher.Config) publisher.Config {
	onConfirmed, onUnroutable := c.OnConfirmed, c.OnUnroutable
	c.OnConfirmed = func(exchange string, n int, latency time.Duration) {
		m.Confirmed(exchange, n, latency)
		if onConfirmed != nil {
			onConfirmed(exchange, n, latency)
		}
	}
	c.OnUnroutable = func(exchange, key, id string) {
		m.Unroutable(exchange, key, id)
		if onUnroutable != nil {
			onUnroutable(exchange, key, id)
		}
	}
	return c
}

// Confirmed counts n events confirmed on exchange after latency, with the
// signature of publisher.Config.OnConfirmed, which the publisher calls
// for each event with its own publish to confirm time.
func (m *Metrics) Confirmed(exchange string, n int, latency time.Duration) {
	p := producerOf(exchange)
	m.published.WithLabelValues(p).Add(float64(n))
	m.confirm.Observe(latency.Seconds())
	if m.backlog != nil {
		m.backlog.see(p)
	}
}

// Unroutable counts one event returned by the broker, with the signature
// of publisher.Config.OnUnroutable.
func (m *Metrics) Unroutable(exchange, _, _ string) {
	p := producerOf(exchange)
	m.unroutable.WithLabelValues(p).Inc()
	if m.backlog != nil {
		m.backlog.see(p)
	}
}

// producerOf is the producer of an exchange "<producer>.events".
func producerOf(exchange string) string {
	return strings.TrimSuffix(exchange, ".events")
}

// backlogCollector reads the outbox's backlog per producer when scraped.
type backlogCollector struct {
	db      *sql.DB
	backlog *prometheus.Desc
	oldest  *prometheus.Desc

	mu   sync.Mutex
	seen map[string]bool
	at   time.Time
	last []outbox.ProducerStatus
	err  error
}

var _ prometheus.Collector = (*backlogCollector)(nil)

func newBacklogCollector(db *sql.DB) *backlogCollector {
	return &backlogCollector{
		db: db,
		backlog: prometheus.NewDesc("warren_outbox_backlog",
			"Outbox rows not yet published.", []string{"producer"}, nil),
		oldest: prometheus.NewDesc("warren_outbox_oldest_unpublished_seconds",
			"Age of the oldest outbox row not yet published (0 when none).", []string{"producer"}, nil),
		seen: map[string]bool{},
	}
}

func (b *backlogCollector) see(producer string) {
	b.mu.Lock()
	b.seen[producer] = true
	b.mu.Unlock()
}

func (b *backlogCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- b.backlog
	ch <- b.oldest
}

func (b *backlogCollector) Collect(ch chan<- prometheus.Metric) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	if b.at.IsZero() || now.Sub(b.at) >= BacklogRefresh {
		ctx, cancel := context.WithTimeout(context.Background(), BacklogTimeout)
		b.last, b.err = outbox.Backlog(ctx, b.db)
		cancel()
		b.at = now
	}
	if b.err != nil {
		ch <- prometheus.NewInvalidMetric(b.backlog, b.err)
		return
	}
	listed := map[string]bool{}
	for _, s := range b.last {
		b.seen[s.Producer] = true
		listed[s.Producer] = true
		age := 0.0
		if !s.OldestUnpublished.IsZero() {
			age = max(now.Sub(s.OldestUnpublished).Seconds(), 0)
		}
		ch <- prometheus.MustNewConstMetric(b.backlog, prometheus.GaugeValue, float64(s.Backlog), s.Producer)
		ch <- prometheus.MustNewConstMetric(b.oldest, prometheus.GaugeValue, age, s.Producer)
	}
	for p := range b.seen {
		if !listed[p] {
			ch <- prometheus.MustNewConstMetric(b.backlog, prometheus.GaugeValue, 0, p)
			ch <- prometheus.MustNewConstMetric(b.oldest, prometheus.GaugeValue, 0, p)
		}
	}
}

// routerMetrics are Watermill's own router metrics (components/metrics),
// registered once so that a registration error is returned here instead
// of panicking inside the router.
type routerMetrics struct {
	builder    wmetrics.PrometheusMetricsBuilder
	middleware message.HandlerMiddleware
}

// RouterMetricsNamespace prefixes Watermill's router metrics.
const RouterMetricsNamespace = "watermill"

func newRouterMetrics(reg prometheus.Registerer, labels []wmetrics.MetricLabel) (r routerMetrics, err error) {
	r.builder = wmetrics.NewPrometheusMetricsBuilderWithConfig(reg, wmetrics.PrometheusMetricsBuilderConfig{
		Namespace:        RouterMetricsNamespace,
		AdditionalLabels: labels,
	})
	defer func() {
		if p := recover(); p != nil { // NewRouterMiddleware panics on a registration error
			err = fmt.Errorf("watermill router metrics: %v", p)
		}
	}()
	r.middleware = r.builder.NewRouterMiddleware().Middleware
	return r, nil
}

func (r routerMetrics) instrument(router *message.Router) {
	router.AddSubscriberDecorators(r.builder.DecorateSubscriber)
	router.AddMiddleware(r.middleware)
}
