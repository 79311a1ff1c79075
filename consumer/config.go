package consumer

import (
	dbsql "database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/warrenmq/warren/publisher"
)

// Defaults of Config.
const (
	// DefaultConcurrency is how many deliveries are in flight at once. The
	// inbox rows of the deliveries in flight commit together, so this is
	// also the largest commit batch: with fewer, each delivery pays a
	// larger share of an fsync.
	DefaultConcurrency = 32
	// DefaultHandlerTimeout bounds one handler run.
	DefaultHandlerTimeout = 30 * time.Second
	// DefaultMaxAttempts is how many handler runs a delivery gets before it
	// is poisoned.
	DefaultMaxAttempts = 5
	// DefaultImmediateRetries is how many times a failed handler is run
	// again at once, in process, before the delivery goes to a retry queue.
	DefaultImmediateRetries = 1
	// DefaultMaxBodyBytes is the largest body handled; a larger one is
	// poisoned with reason too-large.
	DefaultMaxBodyBytes = 1 << 20
	// DefaultRetention is how long processed inbox rows are kept.
	DefaultRetention = 30 * 24 * time.Hour
	// DefaultPruneInterval is how often the consumer prunes its inbox.
	DefaultPruneInterval = time.Hour
	// DefaultProbeWait is how long Ready waits for the database's write
	// lock.
	DefaultProbeWait = time.Second
)

// DefaultRetryDelays are the delays of the retry queues, by retry: the
// first trip through a retry queue waits 1s, the second 10s, and so on; the
// last delay repeats.
func DefaultRetryDelays() []time.Duration {
	return []time.Duration{time.Second, 10 * time.Second, time.Minute, 10 * time.Minute}
}

// QueueType is the kind of the consumer's queues.
type QueueType string

// Queue types.
const (
	// Quorum queues are replicated and count redeliveries; the default.
	Quorum QueueType = "quorum"
	// Classic queues, for brokers or policies that need them.
	Classic QueueType = "classic"
)

// Subscription is one producer a consumer reads from.
type Subscription struct {
	// Producer is the producing application: the consumer's queue is bound
	// to its exchange "<producer>.events".
	Producer string
	// Keys are the routing keys (event types, with the topic wildcards *
	// and #) bound. Default ["#"]: every event.
	Keys []string
}

// Hooks report what the consumer does, for metrics. Every hook is optional,
// must be quick and safe for concurrent use.
type Hooks struct {
	// Delivered is called for every delivery received.
	Delivered func()
	// Duplicate is called for a delivery acked without running the handler
	// because its message id was already processed.
	Duplicate func()
	// Retried is called when a delivery was sent to a retry queue.
	Retried func()
	// Poisoned is called when a delivery was parked in the poison queue,
	// with the kind of reason: max-attempts, malformed, too-large, expired
	// (or auto-ack for a failure dropped under AutoAck).
	Poisoned func(reason string)
	// HandlerDuration is called after every handler run, failed or not.
	HandlerDuration func(time.Duration)
	// InFlight is called with the number of deliveries being handled
	// whenever it changes.
	InFlight func(n int)
}

// Config configures a Consumer. The zero value of each field means its
// default, given at the end of its comment.
type Config struct {
	// Consumer is the consuming application's name ([a-z0-9][a-z0-9-]*, at
	// most 63 characters): its queue, its retry and poison queues and its
	// inbox rows carry it. Required.
	Consumer string
	// DB is the application's database, migrated by sql.Migrate: the inbox
	// lives there, and handlers write in its transactions. Required.
	DB *dbsql.DB
	// From are the producers to read from and their routing keys.
	// Required: at least one.
	From []Subscription
	// Connection says how to reach RabbitMQ; see
	// publisher.ConnectionConfig for its defaults.
	Connection publisher.ConnectionConfig
	// QueueType is the kind of the consumer's queues. Default Quorum.
	QueueType QueueType
	// Concurrency is how many deliveries are handled at once. Default
	// DefaultConcurrency (32).
	Concurrency int
	// Prefetch is how many unacked deliveries the broker sends ahead on the
	// consumer's channel (the AMQP prefetch count). Default 2 ×
	// Concurrency.
	Prefetch int
	// HandlerTimeout bounds one handler run (its context's deadline).
	// Default DefaultHandlerTimeout (30s).
	HandlerTimeout time.Duration
	// MaxAttempts is how many handler runs a delivery gets, counting
	// runs in process, trips through retry queues and redeliveries after a
	// crash, before it is poisoned with reason max-attempts. Default
	// DefaultMaxAttempts (5).
	MaxAttempts int
	// ImmediateRetries is how many times a failed handler runs again at
	// once, in process, before the delivery goes to a retry queue; -1 for
	// none. Default DefaultImmediateRetries (1).
	ImmediateRetries int
	// RetryDelays are the delays of the retry queues "<consumer>.retry.<delay>"
	// by trip: the n-th trip waits RetryDelays[n-1], the last one repeats.
	// Default DefaultRetryDelays (1s, 10s, 1m, 10m).
	RetryDelays []time.Duration
	// AutoAck acks each delivery as soon as it arrives, before the handler
	// runs: faster, but a delivery whose handler fails (after the immediate
	// retries) or that is in flight when the process dies is lost. The
	// consumer logs a warning saying so when it starts. Default false.
	AutoAck bool
	// Binary makes Delivery.JSON print every body in base64. Default false:
	// text when the body is valid UTF-8.
	Binary bool
	// Expiration poisons, with reason expired, a delivery that waited
	// longer than this in the consumer's queue (by its AMQP timestamp, or
	// when it came back from a retry queue). Default 0: off.
	Expiration time.Duration
	// MaxBodyBytes is the largest body handled; a larger one is poisoned
	// with reason too-large. -1 for no limit. Default DefaultMaxBodyBytes
	// (1 MiB).
	MaxBodyBytes int
	// NoDeclare only verifies that the exchanges and queues exist instead
	// of declaring them (for brokers where the application may not
	// declare; run `warren topology declare` with more rights once).
	// Default false.
	NoDeclare bool
	// Logger receives the consumer's log lines. Default slog.Default().
	Logger *slog.Logger
	// Hooks report deliveries, duplicates, retries and poisonings for
	// metrics. Default: none.
	Hooks Hooks
	// Metrics, if set, counts this consumer's deliveries in the
	// contract's Prometheus metrics (see NewMetrics; Hooks still run) and
	// adds Watermill's router metrics. Default: none.
	Metrics *Metrics
	// TracerProvider makes the spans of handler runs, which continue the
	// trace of each delivery's traceparent header. Default: OpenTelemetry's
	// global provider (otel.GetTracerProvider), which makes none until the
	// application sets one.
	TracerProvider trace.TracerProvider
	// Retention is how long the consumer's processed inbox rows are kept:
	// the consumer deletes older ones (inbox.Prune, in short batches) when
	// it starts and then every PruneInterval. Retrying and poisoned rows
	// are kept. A message id whose row was pruned is no longer
	// deduplicated. Negative keeps them forever. Default DefaultRetention
	// (30 days).
	Retention time.Duration
	// PruneInterval is how often the consumer prunes its inbox. Default
	// DefaultPruneInterval (1h).
	PruneInterval time.Duration
	// ProbeWait is how long Ready waits for the database's write lock
	// before it reports the database as not writable. Default
	// DefaultProbeWait (1s).
	ProbeWait time.Duration
}

// WithDefaults returns a copy of c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	c.Connection = c.Connection.WithDefaults()
	if c.QueueType == "" {
		c.QueueType = Quorum
	}
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConcurrency
	}
	if c.Prefetch == 0 {
		c.Prefetch = 2 * c.Concurrency
	}
	if c.HandlerTimeout == 0 {
		c.HandlerTimeout = DefaultHandlerTimeout
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = DefaultMaxAttempts
	}
	if c.ImmediateRetries == 0 {
		c.ImmediateRetries = DefaultImmediateRetries
	}
	if len(c.RetryDelays) == 0 {
		c.RetryDelays = DefaultRetryDelays()
	}
	if c.MaxBodyBytes == 0 {
		c.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Retention == 0 {
		c.Retention = DefaultRetention
	}
	if c.PruneInterval == 0 {
		c.PruneInterval = DefaultPruneInterval
	}
	if c.ProbeWait == 0 {
		c.ProbeWait = DefaultProbeWait
	}
	from := make([]Subscription, len(c.From))
	for i, s := range c.From {
		if len(s.Keys) == 0 {
			s.Keys = []string{"#"}
		}
		from[i] = s
	}
	c.From = from
	return c
}

// Validate checks c (after WithDefaults) and returns a plain-English error
// that names the setting at fault.
func (c Config) Validate() error {
	c = c.WithDefaults()
	if c.Consumer == "" {
		return errors.New("consumer app (consumer.app, --app) is not set: name the consuming application")
	}
	if err := publisher.ValidateName(c.Consumer); err != nil {
		return fmt.Errorf("consumer app (consumer.app, --app): %w", err)
	}
	if c.DB == nil {
		return errors.New("consumer database is not set: give the application's *sql.DB")
	}
	if len(c.From) == 0 {
		return errors.New("consumer subscriptions (consumer.from, --from) are empty: name at least one producer to read from")
	}
	seen := map[string]bool{}
	for _, s := range c.From {
		if err := publisher.ValidateName(s.Producer); err != nil {
			return fmt.Errorf("consumer subscription (consumer.from, --from) producer: %w", err)
		}
		if seen[s.Producer] {
			return fmt.Errorf("consumer subscription (consumer.from, --from): producer %q is listed twice: give its keys in one entry", s.Producer)
		}
		seen[s.Producer] = true
		for _, k := range s.Keys {
			if err := validateKey(k); err != nil {
				return fmt.Errorf("consumer subscription (consumer.from, --from) to %q: %w", s.Producer, err)
			}
		}
	}
	if err := c.Connection.Validate(); err != nil {
		return err
	}
	switch {
	case c.QueueType != Quorum && c.QueueType != Classic:
		return fmt.Errorf("consumer queue type %q is unknown: use %q or %q", c.QueueType, Quorum, Classic)
	case c.Concurrency < 1:
		return fmt.Errorf("consumer concurrency is %d: it must be at least 1", c.Concurrency)
	case c.Concurrency > 1000:
		return fmt.Errorf("consumer concurrency is %d: at most 1000 deliveries are handled at once; use fewer", c.Concurrency)
	case c.Prefetch < c.Concurrency:
		return fmt.Errorf("consumer prefetch is %d: it must be at least the concurrency (%d), or handlers wait for deliveries", c.Prefetch, c.Concurrency)
	case c.Prefetch > 65535:
		return fmt.Errorf("consumer prefetch is %d: AMQP allows at most 65535", c.Prefetch)
	case c.HandlerTimeout < 0:
		return fmt.Errorf("consumer handler timeout (handler_timeout) is %s: it must be positive", c.HandlerTimeout)
	case c.MaxAttempts < 1:
		return fmt.Errorf("consumer max attempts (max_attempts) is %d: it must be at least 1", c.MaxAttempts)
	case c.ImmediateRetries < -1:
		return fmt.Errorf("consumer immediate retries is %d: use -1 for none, or a count", c.ImmediateRetries)
	case c.Expiration < 0:
		return fmt.Errorf("consumer expiration is %s: use 0 for none, or a positive duration", c.Expiration)
	case c.MaxBodyBytes < -1:
		return fmt.Errorf("consumer max body bytes is %d: use -1 for no limit, or a size", c.MaxBodyBytes)
	case c.PruneInterval < 0:
		return fmt.Errorf("consumer prune interval is %s: it must be positive", c.PruneInterval)
	case c.ProbeWait < 0:
		return fmt.Errorf("consumer probe wait is %s: it must be positive", c.ProbeWait)
	}
	for i, d := range c.RetryDelays {
		if d < time.Millisecond {
			return fmt.Errorf("consumer retry delay %d (retry_delays) is %s: it must be at least 1ms", i+1, d)
		}
		if d > 24*time.Hour*49 {
			return fmt.Errorf("consumer retry delay %d (retry_delays) is %s: RabbitMQ's message TTL stops at about 49 days", i+1, d)
		}
	}
	return nil
}

// validateKey checks a binding key: dot-separated words, * and # whole words.
func validateKey(k string) error {
	if k == "" {
		return errors.New("a routing key is empty: use # for every event")
	}
	if len(k) > 255 {
		return fmt.Errorf("routing key %.20q… is longer than 255 bytes", k)
	}
	for _, w := range strings.Split(k, ".") {
		if strings.ContainsAny(w, "*#") && w != "*" && w != "#" {
			return fmt.Errorf("routing key %q: * and # must stand alone between dots, as in company.* or #", k)
		}
	}
	return nil
}

// immediateRetries returns the number of in-process retries (none for -1).
func (c Config) immediateRetries() int { return max(c.ImmediateRetries, 0) }

// retryDelay is the delay of the n-th trip (1-based) through a retry queue.
func (c Config) retryDelay(trip int) time.Duration {
	i := min(max(trip, 1), len(c.RetryDelays)) - 1
	return c.RetryDelays[i]
}
