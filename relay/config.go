package relay

import (
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

// Defaults for Config.
const (
	DefaultWindow          = 512
	DefaultBatchSize       = 500
	DefaultPublishBatch    = 64
	DefaultMaxBufferedRows = 2048
	DefaultMaxBufferBytes  = 16 << 20
	DefaultRetryMin        = 200 * time.Millisecond
	DefaultRetryMax        = 30 * time.Second
	DefaultDrainTimeout    = 30 * time.Second
	DefaultLockRetry       = 250 * time.Millisecond
	// DefaultRetention is how long published rows are kept.
	DefaultRetention = 7 * 24 * time.Hour
	// DefaultPruneInterval is how often the relay prunes published rows.
	DefaultPruneInterval = time.Hour
	// DefaultProbeWait is how long Ready waits for the database's write
	// lock.
	DefaultProbeWait = time.Second
)

// Config configures a Relay.
type Config struct {
	// DB is the application's database holding warren_outbox. Required.
	DB *sql.DB
	// DBPath is the database file: the relay watches it for commits and
	// keeps its leader lock next to it. Required.
	DBPath string
	// Publisher publishes to RabbitMQ and returns after the broker
	// confirmed; normally a *publisher.Publisher. Required.
	Publisher message.Publisher
	// Window is how many rows may be in flight (published, not yet
	// confirmed) at once. Default: DefaultWindow.
	Window int
	// BatchSize is how many rows one read takes. Default: DefaultBatchSize.
	BatchSize int
	// PublishBatch is how many rows, at most, one message of the relay's
	// Watermill Router carries to the publisher: the rows ready at once
	// (one per aggregate, one producer) go in one call, each confirmed and
	// marked on its own. A steady trickle makes batches of one; a backlog
	// makes full ones and spares the Router's per-message work (a
	// goroutine, ack channels, contexts) for all but one row in
	// PublishBatch. At most Window. Default: DefaultPublishBatch.
	PublishBatch int
	// MaxBufferedRows bounds the rows read ahead and held in memory.
	// Default: DefaultMaxBufferedRows.
	MaxBufferedRows int
	// MaxBufferBytes bounds the payload bytes read ahead. Default:
	// DefaultMaxBufferBytes.
	MaxBufferBytes int
	// MaxPayloadBytes is the payload limit rows are validated with.
	// Default: outbox.DefaultMaxPayloadBytes.
	MaxPayloadBytes int
	// RetryMin and RetryMax bound the backoff before a failed row is tried
	// again. Defaults: DefaultRetryMin, DefaultRetryMax.
	RetryMin, RetryMax time.Duration
	// DrainTimeout bounds how long a stop waits for outstanding confirms.
	// Default: DefaultDrainTimeout.
	DrainTimeout time.Duration
	// LockFile is the leader lock. Default: DBPath + ".relay.lock".
	LockFile string
	// PollFallback is how often the relay reads without a change
	// notification. Default: outbox.DefaultWatchFallback.
	PollFallback time.Duration
	// Logger receives the relay's logs. Default: slog.Default().
	Logger *slog.Logger
	// Metrics, if set, gets Watermill's router metrics of the relay's
	// router; the outbox and publisher metrics come from NewMetrics and
	// Metrics.PublisherConfig. Default: none.
	Metrics *Metrics
	// Retention is how long published rows are kept: the relay deletes
	// older ones (outbox.Prune, in short batches) when it starts
	// publishing and then every PruneInterval. Negative keeps them
	// forever. Default: DefaultRetention (7 days).
	Retention time.Duration
	// PruneInterval is how often the relay prunes. Default:
	// DefaultPruneInterval (1h).
	PruneInterval time.Duration
	// ProbeWait is how long Ready waits for the database's write lock
	// before it reports the database as not writable. Default:
	// DefaultProbeWait (1s).
	ProbeWait time.Duration
}

// WithDefaults returns c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	if c.Window == 0 {
		c.Window = DefaultWindow
	}
	if c.BatchSize == 0 {
		c.BatchSize = DefaultBatchSize
	}
	if c.PublishBatch == 0 {
		c.PublishBatch = min(DefaultPublishBatch, c.Window)
	}
	if c.MaxBufferedRows == 0 {
		c.MaxBufferedRows = DefaultMaxBufferedRows
	}
	if c.MaxBufferBytes == 0 {
		c.MaxBufferBytes = DefaultMaxBufferBytes
	}
	if c.RetryMin == 0 {
		c.RetryMin = DefaultRetryMin
	}
	if c.RetryMax == 0 {
		c.RetryMax = DefaultRetryMax
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
	if c.LockFile == "" && c.DBPath != "" {
		c.LockFile = c.DBPath + ".relay.lock"
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
	return c
}

// Validate returns a plain-English error for a configuration that cannot
// work.
func (c Config) Validate() error {
	var errs []error
	if c.DB == nil {
		errs = append(errs, errors.New("relay config: DB is required"))
	}
	if c.DBPath == "" {
		errs = append(errs, errors.New("relay config: DBPath is required (the relay watches the file for commits)"))
	}
	if c.Publisher == nil {
		errs = append(errs, errors.New("relay config: Publisher is required"))
	}
	for name, v := range map[string]int{"Window": c.Window, "BatchSize": c.BatchSize, "PublishBatch": c.PublishBatch, "MaxBufferedRows": c.MaxBufferedRows, "MaxBufferBytes": c.MaxBufferBytes} {
		if v < 0 {
			errs = append(errs, fmt.Errorf("relay config: %s is negative (%d)", name, v))
		}
	}
	if c.Window > 0 && c.PublishBatch > c.Window {
		errs = append(errs, fmt.Errorf("relay config: PublishBatch %d is above Window %d", c.PublishBatch, c.Window))
	}
	if c.RetryMin < 0 || c.RetryMax < 0 || c.DrainTimeout < 0 || c.PollFallback < 0 || c.PruneInterval < 0 || c.ProbeWait < 0 {
		errs = append(errs, errors.New("relay config: durations must not be negative"))
	}
	if c.RetryMax != 0 && c.RetryMin > c.RetryMax {
		errs = append(errs, fmt.Errorf("relay config: RetryMin %s is above RetryMax %s", c.RetryMin, c.RetryMax))
	}
	return errors.Join(errs...)
}
