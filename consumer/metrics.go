package consumer

import (
	"fmt"
	"sync"
	"time"

	wmetrics "github.com/ThreeDotsLabs/watermill/components/metrics"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/prometheus/client_golang/prometheus"
)

// HandlerBuckets are the buckets of warren_consumer_handler_seconds.
var HandlerBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

// Metrics are the consumers' Prometheus metrics, with the names and labels
// the contract fixes:
//
//	warren_consumer_deliveries_total{consumer}        deliveries received
//	warren_consumer_duplicates_total{consumer}        acked without running the handler
//	warren_consumer_retries_total{consumer}           sent to a retry queue
//	warren_consumer_poisoned_total{consumer,reason}   parked in the poison queue
//	warren_consumer_handler_seconds{consumer}         handler runs, failed or not
//	warren_consumer_in_flight{consumer}               deliveries being handled now
//
// reason is max-attempts, malformed, too-large, expired (or auto-ack, for
// a failure dropped under AutoAck). Give them to consumers in
// Config.Metrics: each consumer counts under its name (several consumers
// of one process share one Metrics), and its router gets Watermill's
// router metrics (watermill_handler_execution_time_seconds and
// watermill_subscriber_messages_received_total, with handler
// "warren-<consumer>" for all its subscriptions). Config.Hooks still run.
type Metrics struct {
	deliveries *prometheus.CounterVec
	duplicates *prometheus.CounterVec
	retries    *prometheus.CounterVec
	poisoned   *prometheus.CounterVec
	handler    *prometheus.HistogramVec
	inFlight   *inFlightCollector
	router     routerMetrics
}

// NewMetrics registers the consumer metrics on reg and returns them. It
// fails when reg holds other metrics of the same names.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, append([]string{"consumer"}, labels...))
	}
	m := &Metrics{
		deliveries: counter("warren_consumer_deliveries_total", "Deliveries received from the consumer's queue."),
		duplicates: counter("warren_consumer_duplicates_total", "Deliveries acked without running the handler: their message id was processed before."),
		retries:    counter("warren_consumer_retries_total", "Deliveries sent to a retry queue after their handler failed."),
		poisoned:   counter("warren_consumer_poisoned_total", "Deliveries parked in the poison queue, by reason.", "reason"),
		handler: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "warren_consumer_handler_seconds",
			Help:    "Handler runs, failed or not (a Preparer's Prepare and Handle together).",
			Buckets: HandlerBuckets,
		}, []string{"consumer"}),
		inFlight: &inFlightCollector{
			desc:    prometheus.NewDesc("warren_consumer_in_flight", "Deliveries being handled now.", []string{"consumer"}, nil),
			sources: map[string][]func() int64{},
		},
	}
	for _, c := range []prometheus.Collector{m.deliveries, m.duplicates, m.retries, m.poisoned, m.handler, m.inFlight} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("consumer metrics: %w", err)
		}
	}
	r, err := newRouterMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("consumer metrics: %w", err)
	}
	m.router = r
	return m, nil
}

// attach makes c count into m: its hooks (calling the configured ones
// too) and its in-flight deliveries, read when scraped.
func (m *Metrics) attach(c *Consumer) {
	name := c.cfg.Consumer
	deliveries := m.deliveries.WithLabelValues(name)
	duplicates := m.duplicates.WithLabelValues(name)
	retries := m.retries.WithLabelValues(name)
	handler := m.handler.WithLabelValues(name)
	for _, r := range []string{ReasonMaxAttempts, ReasonMalformed, ReasonTooLarge, ReasonExpired} {
		m.poisoned.WithLabelValues(name, r) // listed at 0 from the start
	}
	next := c.cfg.Hooks
	h := next
	h.Delivered = func() {
		deliveries.Inc()
		if next.Delivered != nil {
			next.Delivered()
		}
	}
	h.Duplicate = func() {
		duplicates.Inc()
		if next.Duplicate != nil {
			next.Duplicate()
		}
	}
	h.Retried = func() {
		retries.Inc()
		if next.Retried != nil {
			next.Retried()
		}
	}
	h.Poisoned = func(reason string) {
		m.poisoned.WithLabelValues(name, reason).Inc()
		if next.Poisoned != nil {
			next.Poisoned(reason)
		}
	}
	h.HandlerDuration = func(d time.Duration) {
		handler.Observe(d.Seconds())
		if next.HandlerDuration != nil {
			next.HandlerDuration(d)
		}
	}
	c.cfg.Hooks = h
	m.inFlight.add(name, c.inFlight.Load)
}

// inFlightCollector reads the consumers' in-flight counts when scraped, so
// the gauge is exact even when handlers finish at the same moment.
type inFlightCollector struct {
	desc    *prometheus.Desc
	mu      sync.Mutex
	sources map[string][]func() int64
}

func (f *inFlightCollector) add(consumer string, src func() int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sources[consumer] = append(f.sources[consumer], src)
}

func (f *inFlightCollector) Describe(ch chan<- *prometheus.Desc) { ch <- f.desc }

func (f *inFlightCollector) Collect(ch chan<- prometheus.Metric) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for name, srcs := range f.sources {
		var n int64
		for _, s := range srcs {
			n += s()
		}
		ch <- prometheus.MustNewConstMetric(f.desc, prometheus.GaugeValue, float64(n), name)
	}
}

// routerMetrics are Watermill's own router metrics (components/metrics),
// registered here so that a registration error is returned instead of
// panicking inside the router. A consumer's router has one handler,
// "warren-<consumer>", the name its metrics carry.
type routerMetrics struct {
	builder    wmetrics.PrometheusMetricsBuilder
	middleware message.HandlerMiddleware
}

// RouterMetricsNamespace prefixes Watermill's router metrics.
const RouterMetricsNamespace = "watermill"

func newRouterMetrics(reg prometheus.Registerer) (r routerMetrics, err error) {
	r.builder = wmetrics.NewPrometheusMetricsBuilderWithConfig(reg, wmetrics.PrometheusMetricsBuilderConfig{
		Namespace: RouterMetricsNamespace,
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
