package inbox

import (
	"context"
	dbsql "database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	wsql "github.com/warrenmq/warren/sql"
)

// Status is the state of an inbox row.
type Status string

// The statuses of the contract.
const (
	// StatusProcessed: the handler succeeded and its writes committed with
	// the row.
	StatusProcessed Status = "processed"
	// StatusRetrying: the handler failed and the delivery waits for another
	// attempt (in process or in a retry queue).
	StatusRetrying Status = "retrying"
	// StatusPoisoned: the delivery was parked in the poison queue.
	StatusPoisoned Status = "poisoned"
)

// Valid reports whether s is one of the contract's statuses.
func (s Status) Valid() bool {
	return s == StatusProcessed || s == StatusRetrying || s == StatusPoisoned
}

// MaxErrorBytes bounds the error text kept in last_error and sent in the
// warren-error header.
const MaxErrorBytes = 1024

// ErrorLine renders err as the contract keeps errors: one line, valid
// UTF-8, at most MaxErrorBytes bytes.
func ErrorLine(err error) string {
	if err == nil {
		return ""
	}
	s := strings.Join(strings.Fields(strings.ToValidUTF8(err.Error(), "\uFFFD")), " ")
	if len(s) <= MaxErrorBytes {
		return s
	}
	cut := MaxErrorBytes - len("…")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// Delivery is one AMQP delivery as the inbox records it: where it came
// from, its properties, headers and body.
type Delivery struct {
	Consumer   string // the consuming application
	MessageID  string // message_id: the event id; the dedup key with Consumer
	Producer   string // app_id
	Exchange   string
	RoutingKey string
	EventType  string // type

	// From the headers aggregate-type, aggregate-id, aggregate-version.
	AggregateType    string
	AggregateID      string
	AggregateVersion *int64

	ContentType     string
	ContentEncoding string
	CorrelationID   string
	ReplyTo         string
	Expiration      string // per-message TTL in milliseconds, as AMQP has it
	UserID          string
	DeliveryMode    uint8
	Priority        uint8
	Timestamp       time.Time // the AMQP timestamp; zero when absent

	// Headers are the AMQP headers rendered as strings (numbers in decimal,
	// tables as JSON).
	Headers map[string]string
	Body    []byte

	// ReceivedAt is when this delivery arrived; for an Entry, when the
	// message first arrived (first_received_at).
	ReceivedAt time.Time

	// Facts of one delivery, not stored: zero on an Entry.
	DeliveryTag uint64
	Redelivered bool
}

// Properties returns d's AMQP properties in the contract's JSON shape.
func (d *Delivery) Properties() Properties {
	p := Properties{
		AppID:           d.Producer,
		ContentType:     d.ContentType,
		ContentEncoding: d.ContentEncoding,
		CorrelationID:   d.CorrelationID,
		DeliveryMode:    d.DeliveryMode,
		Expiration:      d.Expiration,
		MessageID:       d.MessageID,
		Priority:        d.Priority,
		ReplyTo:         d.ReplyTo,
		Type:            d.EventType,
		UserID:          d.UserID,
	}
	if !d.Timestamp.IsZero() {
		p.Timestamp = d.Timestamp.Unix()
	}
	return p
}

// setProperties copies the properties kept in the properties column into d.
func (d *Delivery) setProperties(p Properties) {
	d.ContentEncoding = p.ContentEncoding
	d.CorrelationID = p.CorrelationID
	d.ReplyTo = p.ReplyTo
	d.Expiration = p.Expiration
	d.UserID = p.UserID
	d.DeliveryMode = p.DeliveryMode
	d.Priority = p.Priority
	if p.Timestamp != 0 {
		d.Timestamp = time.Unix(p.Timestamp, 0).UTC()
	}
}

// storedProperties is the properties column: the AMQP properties that have
// no column of their own, with the contract's JSON names, empty ones left
// out.
type storedProperties struct {
	ContentEncoding string `json:"contentEncoding,omitempty"`
	CorrelationID   string `json:"correlationId,omitempty"`
	DeliveryMode    uint8  `json:"deliveryMode,omitempty"`
	Expiration      string `json:"expiration,omitempty"`
	Priority        uint8  `json:"priority,omitempty"`
	ReplyTo         string `json:"replyTo,omitempty"`
	UserID          string `json:"userId,omitempty"`
	Timestamp       int64  `json:"timestamp,omitempty"`
}

// Execer runs a statement: a *sql.Tx (the handler's transaction) or a
// *sql.DB (the statement then commits on its own, as a short transaction).
type Execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (dbsql.Result, error)
}

// Querier runs a query: a *sql.Tx, *sql.DB or *sql.Conn.
type Querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*dbsql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *dbsql.Row
}

// Processed reports whether (consumer, messageID) is recorded as processed.
// In the handler's transaction the answer holds until the commit; outside
// one it is a hint (a concurrent commit may follow it).
func Processed(ctx context.Context, q Querier, consumer, messageID string) (bool, error) {
	var one int
	err := q.QueryRowContext(ctx,
		`SELECT 1 FROM warren_inbox WHERE consumer = ? AND message_id = ? AND status = 'processed'`,
		consumer, messageID).Scan(&one)
	if errors.Is(err, dbsql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("inbox: read %s/%s: %w", consumer, messageID, err)
	}
	return true, nil
}

const insertColumns = `consumer, message_id, producer, exchange, routing_key, event_type,
	aggregate_type, aggregate_id, aggregate_version, content_type, headers, properties, body,
	status, attempts, last_error, first_received_at, processed_at`

// rowArgs returns the values for insertColumns.
// body is nil (NULL: not kept) or a []byte.
func rowArgs(d *Delivery, status Status, attempts int, lastError string, body any, processedAt any) ([]any, error) {
	if d.Consumer == "" || d.MessageID == "" {
		return nil, fmt.Errorf("inbox: a delivery needs a consumer and a message id (got %q, %q)", d.Consumer, d.MessageID)
	}
	headers := encodeHeaders(d.Headers)
	props := encodeProperties(storedProperties{
		ContentEncoding: d.ContentEncoding, CorrelationID: d.CorrelationID, DeliveryMode: d.DeliveryMode,
		Expiration: d.Expiration, Priority: d.Priority, ReplyTo: d.ReplyTo, UserID: d.UserID,
		Timestamp: d.Properties().Timestamp,
	})
	received := d.ReceivedAt
	if received.IsZero() {
		received = time.Now()
	}
	var lastErr any
	if lastError != "" {
		lastErr = lastError
	}
	return []any{
		d.Consumer, d.MessageID, d.Producer, d.Exchange, d.RoutingKey, d.EventType,
		nullString(d.AggregateType), nullString(d.AggregateID), d.AggregateVersion,
		d.ContentType, string(headers), string(props), body,
		string(status), attempts, lastErr, wsql.FormatTime(received), processedAt,
	}, nil
}

func nullString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// MarkProcessed records d as processed in e, normally the handler's
// transaction: a rollback undoes it with the handler's writes. attempt is
// the number of this handler run as the delivery counts it (1 for a first
// delivery); the row keeps the larger of it and one more than the runs
// recorded before.
//
// It returns false, and changes nothing, when the row is already processed:
// the delivery is a duplicate and the handler must not run (roll its
// effects back, or run MarkProcessed before the handler and skip it).
func MarkProcessed(ctx context.Context, e Execer, d *Delivery, attempt int) (bool, error) {
	r, err := EncodeProcessed(d, attempt)
	if err != nil {
		return false, err
	}
	return MarkProcessedRow(ctx, e, r)
}

// ProcessedRow is the row MarkProcessed writes for a delivery, encoded
// ahead of the transaction by EncodeProcessed: the consumer encodes it on
// the delivery's own goroutine, so that what runs under SQLite's write
// lock is the insert alone.
type ProcessedRow struct {
	d    *Delivery
	args []any
}

// EncodeProcessed encodes d's row for MarkProcessedRow, with processed_at
// now; attempt counts as in MarkProcessed.
func EncodeProcessed(d *Delivery, attempt int) (*ProcessedRow, error) {
	args, err := rowArgs(d, StatusProcessed, attempt, "", bodyOf(d), wsql.FormatTime(time.Now()))
	if err != nil {
		return nil, err
	}
	return &ProcessedRow{d: d, args: args}, nil
}

// MarkProcessedRow is MarkProcessed for a row encoded by EncodeProcessed.
func MarkProcessedRow(ctx context.Context, e Execer, r *ProcessedRow) (bool, error) {
	d := r.d
	res, err := e.ExecContext(ctx, `INSERT INTO warren_inbox (`+insertColumns+`)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (consumer, message_id) DO UPDATE SET
			status = 'processed',
			attempts = max(warren_inbox.attempts + 1, excluded.attempts),
			last_attempt = 0,
			processed_at = excluded.processed_at
		WHERE warren_inbox.status != 'processed'`, r.args...)
	if err != nil {
		return false, fmt.Errorf("inbox: mark %s/%s processed: %w", d.Consumer, d.MessageID, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("inbox: mark %s/%s processed: %w", d.Consumer, d.MessageID, err)
	}
	return n == 1, nil
}

// RecordFailure records a failed handler run of d with status retrying or
// poisoned and cause as last_error (one line, see ErrorLine). Call it after
// the handler's transaction (or savepoint) was rolled back, with a *sql.DB
// for a short transaction of its own or with a later transaction. attempt
// counts as in MarkProcessed. A row that is already processed is left
// alone.
func RecordFailure(ctx context.Context, e Execer, d *Delivery, attempt int, cause error, status Status) error {
	if status != StatusRetrying && status != StatusPoisoned {
		return fmt.Errorf("inbox: record failure of %s/%s: status %q is not %q or %q", d.Consumer, d.MessageID, status, StatusRetrying, StatusPoisoned)
	}
	lastAttempt := attempt
	if status == StatusPoisoned {
		lastAttempt = 0
	}
	return recordFailure(ctx, e, d, status, ErrorLine(cause), `max(warren_inbox.attempts + 1, excluded.attempts)`, attempt, lastAttempt, bodyOf(d))
}

// RecordPoisoned records that d was parked in the poison queue without a
// handler run (malformed, too large, expired, or out of attempts on
// arrival), with reason as last_error. attempts is the count the delivery
// carried; the row keeps the larger of it and the count recorded before.
// When keepBody is false the body is not stored (a body over the size
// limit, say). A processed row is left alone.
func RecordPoisoned(ctx context.Context, e Execer, d *Delivery, attempts int, reason string, keepBody bool) error {
	var body any
	if keepBody {
		body = bodyOf(d)
	}
	return recordFailure(ctx, e, d, StatusPoisoned, ErrorLine(errors.New(reason)), `max(warren_inbox.attempts, excluded.attempts)`, attempts, 0, body)
}

// bodyOf returns d's body for the body column: an empty body is stored as
// an empty blob, not NULL (which means "not kept").
func bodyOf(d *Delivery) []byte {
	if d.Body == nil {
		return []byte{}
	}
	return d.Body
}

func recordFailure(ctx context.Context, e Execer, d *Delivery, status Status, lastError, attemptsExpr string, attempts, lastAttempt int, body any) error {
	args, err := rowArgs(d, status, attempts, lastError, body, nil)
	if err != nil {
		return err
	}
	_, err = e.ExecContext(ctx, `INSERT INTO warren_inbox (`+insertColumns+`, last_attempt)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (consumer, message_id) DO UPDATE SET
			status = excluded.status,
			attempts = `+attemptsExpr+`,
			last_attempt = excluded.last_attempt,
			last_error = excluded.last_error
		WHERE warren_inbox.status != 'processed'`, append(args, lastAttempt)...)
	if err != nil {
		return fmt.Errorf("inbox: record %s of %s/%s: %w", status, d.Consumer, d.MessageID, err)
	}
	return nil
}

// State is what Lookup reads of a row.
type State struct {
	Status   Status
	Attempts int
	// LastAttempt is the attempt number of the latest run started on a
	// redelivery (RecordStarted) or failed (RecordFailure), as the delivery
	// counted it; 0 after a poisoning or a success.
	LastAttempt int
}

// Lookup reads the state of (consumer, messageID); found is false when
// there is no row.
func Lookup(ctx context.Context, q Querier, consumer, messageID string) (st State, found bool, err error) {
	var status string
	err = q.QueryRowContext(ctx,
		`SELECT status, attempts, last_attempt FROM warren_inbox WHERE consumer = ? AND message_id = ?`,
		consumer, messageID).Scan(&status, &st.Attempts, &st.LastAttempt)
	if errors.Is(err, dbsql.ErrNoRows) {
		return State{}, false, nil
	}
	if err != nil {
		return State{}, false, fmt.Errorf("inbox: read %s/%s: %w", consumer, messageID, err)
	}
	st.Status = Status(status)
	return st, true, nil
}

// RecordStarted records, before the handler runs, that run attempt of a
// redelivered d starts: status retrying and LastAttempt at least attempt,
// so that if the process dies during the run the next delivery of the
// message still counts it. Call it with a *sql.DB or a transaction of its
// own: it must commit before the handler runs. A processed row is left
// alone.
func RecordStarted(ctx context.Context, e Execer, d *Delivery, attempt int) error {
	args, err := rowArgs(d, StatusRetrying, attempt-1, "", bodyOf(d), nil)
	if err != nil {
		return err
	}
	_, err = e.ExecContext(ctx, `INSERT INTO warren_inbox (`+insertColumns+`, last_attempt)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (consumer, message_id) DO UPDATE SET
			status = 'retrying',
			last_attempt = max(warren_inbox.last_attempt, excluded.last_attempt)
		WHERE warren_inbox.status != 'processed'`, append(args, attempt)...)
	if err != nil {
		return fmt.Errorf("inbox: record start of %s/%s: %w", d.Consumer, d.MessageID, err)
	}
	return nil
}

// RecordDuplicate counts one duplicate delivery of (consumer, messageID),
// acked without running the handler. It is a no-op when there is no row.
func RecordDuplicate(ctx context.Context, e Execer, consumer, messageID string) error {
	_, err := e.ExecContext(ctx,
		`UPDATE warren_inbox SET duplicates = duplicates + 1 WHERE consumer = ? AND message_id = ?`,
		consumer, messageID)
	if err != nil {
		return fmt.Errorf("inbox: count duplicate of %s/%s: %w", consumer, messageID, err)
	}
	return nil
}
