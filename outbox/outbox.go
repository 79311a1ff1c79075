package outbox

import (
	"context"
	"database/sql"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"

	wsql "github.com/warrenmq/warren/sql"
)

// Config tunes an Outbox. The zero value is valid.
type Config struct {
	// MaxPayloadBytes is the largest payload accepted. Default:
	// DefaultMaxPayloadBytes (1 MiB).
	MaxPayloadBytes int
}

// WithDefaults returns c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	if c.MaxPayloadBytes == 0 {
		c.MaxPayloadBytes = DefaultMaxPayloadBytes
	}
	return c
}

// Validate reports a configuration that cannot work.
func (c Config) Validate() error {
	if c.MaxPayloadBytes < 0 {
		return fmt.Errorf("outbox config: MaxPayloadBytes is negative (%d)", c.MaxPayloadBytes)
	}
	return nil
}

// Outbox appends events. It holds no connection: every call takes the
// caller's transaction or database.
type Outbox struct {
	cfg Config
}

// New returns an Outbox with cfg (defaults filled in).
func New(cfg Config) (*Outbox, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Outbox{cfg: cfg}, nil
}

var defaultOutbox = &Outbox{cfg: Config{}.WithDefaults()}

// Append appends events with the default configuration; see Outbox.Append.
func Append(ctx context.Context, tx *sql.Tx, events ...Event) ([]string, error) {
	return defaultOutbox.Append(ctx, tx, events...)
}

// AppendDB appends events in a transaction of its own with the default
// configuration; see Outbox.AppendDB.
func AppendDB(ctx context.Context, db *sql.DB, events ...Event) ([]string, error) {
	return defaultOutbox.AppendDB(ctx, db, events...)
}

// Append validates events and inserts them into warren_outbox inside tx, in
// order, and returns their ids. Nothing is published until tx commits; if tx
// rolls back, the events are gone with the business writes. On a validation
// error nothing is inserted.
//
// When ctx carries an OpenTelemetry span, its W3C traceparent is stored
// with every event whose Traceparent is empty: the relay sends it as the
// traceparent header and the consumer's handler continues the trace.
func (o *Outbox) Append(ctx context.Context, tx *sql.Tx, events ...Event) ([]string, error) {
	if tx == nil {
		return nil, fmt.Errorf("outbox append: nil transaction")
	}
	if len(events) == 0 {
		return nil, nil
	}
	type prepared struct {
		ev          *Event
		id          string
		headers     string
		traceparent string
	}
	ps := make([]prepared, len(events))
	traceparent := traceparentFrom(ctx)
	for i := range events {
		ev := &events[i]
		if err := ev.Validate(o.cfg.MaxPayloadBytes); err != nil {
			return nil, fmt.Errorf("outbox append: event %d: %w", i, err)
		}
		id := ev.ID
		if id == "" {
			u, err := uuid.NewV7()
			if err != nil {
				return nil, fmt.Errorf("outbox append: new event id: %w", err)
			}
			id = u.String()
		}
		h, err := encodeHeaders(ev.Headers)
		if err != nil {
			return nil, fmt.Errorf("outbox append: event %d: %w", i, err)
		}
		tp := ev.Traceparent
		if tp == "" {
			tp = traceparent
		}
		ps[i] = prepared{ev: ev, id: id, headers: h, traceparent: tp}
	}
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO warren_outbox
		(event_id, producer, event_type, aggregate_type, aggregate_id, aggregate_version,
		 content_type, headers, payload, correlation_id, expiration, traceparent, created_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return nil, fmt.Errorf("outbox append: prepare: %w", err)
	}
	defer stmt.Close()
	now := wsql.FormatTime(time.Now())
	ids := make([]string, len(ps))
	for i, p := range ps {
		ev := p.ev
		ct := ev.ContentType
		if ct == "" {
			ct = DefaultContentType
		}
		var exp any
		if ev.Expiration > 0 {
			exp = strconv.FormatInt(ev.Expiration.Milliseconds(), 10)
		}
		if _, err := stmt.ExecContext(ctx, p.id, ev.Producer, ev.Type, nullString(ev.AggregateType), nullString(ev.AggregateID),
			ev.AggregateVersion, ct, p.headers, ev.Payload, nullString(ev.CorrelationID), exp, nullString(p.traceparent), now); err != nil {
			return nil, fmt.Errorf("outbox append: insert event %s: %w", p.id, err)
		}
		ids[i] = p.id
	}
	return ids, nil
}

// AppendDB is Append in a transaction of its own: the events are committed
// (and will be published) when it returns nil.
func (o *Outbox) AppendDB(ctx context.Context, db *sql.DB, events ...Event) ([]string, error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("outbox append: begin: %w%s", err, busyHint(err))
	}
	defer func() { _ = tx.Rollback() }()
	ids, err := o.Append(ctx, tx, events...)
	if err != nil {
		return nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("outbox append: commit: %w%s", err, busyHint(err))
	}
	return ids, nil
}

func nullString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// busyHint explains SQLite's "database is locked" to a person.
func busyHint(err error) string {
	if wsql.IsBusy(err) {
		return " (another connection held the database's write lock for longer than the busy timeout; nothing was written)"
	}
	return ""
}
