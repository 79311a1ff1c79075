package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	wsql "github.com/warrenmq/warren/sql"
)

// Row is one row of warren_outbox as the relay reads it. Rows inserted by
// hand may hold anything SQLite accepts; Err says what is wrong with such a
// row (nil for a good one), and the other fields are best effort.
type Row struct {
	Seq              int64
	EventID          string
	Producer         string
	EventType        string
	AggregateType    string
	AggregateID      string
	AggregateVersion *int64
	ContentType      string
	Headers          map[string]string
	Payload          []byte
	CorrelationID    string
	Expiration       string // milliseconds, as AMQP carries it
	Traceparent      string
	CreatedAt        time.Time
	PublishedAt      *time.Time
	// Err is why the row cannot be published as it is; nil when it can.
	Err error
}

// Size is the row's approximate memory footprint, for read-ahead limits.
func (r *Row) Size() int {
	n := 256 + len(r.Payload) + len(r.EventID) + len(r.EventType) + len(r.AggregateID)
	for k, v := range r.Headers {
		n += len(k) + len(v) + 32
	}
	return n
}

// AggregateKey identifies the aggregate whose events must stay in order. A
// row without an aggregate id has a key of its own.
func (r *Row) AggregateKey() string {
	if r.AggregateID == "" {
		return "\x00seq:" + strconv.FormatInt(r.Seq, 10)
	}
	return r.Producer + "\x00" + r.AggregateType + "\x00" + r.AggregateID
}

const rowColumns = `seq, event_id, producer, event_type, aggregate_type, aggregate_id, aggregate_version,
	content_type, headers, payload, correlation_id, expiration, traceparent, created_at, published_at`

type scanner interface{ Scan(...any) error }

// scanRow reads one row tolerantly: SQLite lets another language store a
// number where text belongs and text where a number belongs, so everything
// but seq is scanned loosely and checked here.
func scanRow(s scanner, maxPayload int) (Row, error) {
	var (
		r                                                   Row
		eventID, producer, eventType, aggType, aggID, ctype sql.NullString
		headers, corr, exp, tp, created, published          sql.NullString
		aggVersion                                          any
		payload                                             []byte
	)
	if err := s.Scan(&r.Seq, &eventID, &producer, &eventType, &aggType, &aggID, &aggVersion,
		&ctype, &headers, &payload, &corr, &exp, &tp, &created, &published); err != nil {
		return Row{}, fmt.Errorf("scan outbox row: %w", err)
	}
	r.EventID, r.Producer, r.EventType = eventID.String, producer.String, eventType.String
	r.AggregateType, r.AggregateID = aggType.String, aggID.String
	r.ContentType, r.CorrelationID, r.Traceparent = ctype.String, corr.String, tp.String
	r.Payload = payload
	var problems []string
	add := func(err error) {
		if err != nil {
			problems = append(problems, strings.TrimPrefix(err.Error(), "invalid event: "))
		}
	}
	if r.ContentType == "" {
		r.ContentType = DefaultContentType
	}
	switch v := aggVersion.(type) {
	case nil:
	case int64:
		r.AggregateVersion = &v
	case string, []byte:
		s := fmt.Sprint(v)
		if b, ok := v.([]byte); ok {
			s = string(b)
		}
		n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
		if err != nil {
			add(fmt.Errorf("aggregate_version: %q is not an integer", s))
		} else {
			r.AggregateVersion = &n
		}
	case float64:
		if v != float64(int64(v)) {
			add(fmt.Errorf("aggregate_version: %v is not an integer", v))
		} else {
			n := int64(v)
			r.AggregateVersion = &n
		}
	default:
		add(fmt.Errorf("aggregate_version: %T is not an integer", v))
	}
	h, err := ParseHeaders(headers.String)
	add(err)
	r.Headers = h
	if exp.Valid && exp.String != "" {
		n, err := strconv.ParseInt(exp.String, 10, 64)
		if err != nil || n < 0 {
			add(fmt.Errorf("expiration: %q is not a whole number of milliseconds", exp.String))
		} else {
			r.Expiration = exp.String
		}
	}
	if created.Valid {
		t, err := wsql.ParseTime(created.String)
		if err != nil {
			add(fmt.Errorf("created_at: %w", err))
		}
		r.CreatedAt = t
	}
	if published.Valid {
		t, err := wsql.ParseTime(published.String)
		if err == nil {
			r.PublishedAt = &t
		}
	}
	ev := Event{ID: r.EventID, Producer: r.Producer, Type: r.EventType, Payload: r.Payload,
		ContentType: r.ContentType, CorrelationID: r.CorrelationID, AggregateType: r.AggregateType, Traceparent: r.Traceparent}
	if ev.Payload == nil {
		ev.Payload = []byte{} // NOT NULL in the schema; an empty BLOB scans as nil
	}
	if r.EventID == "" {
		add(fmt.Errorf("event_id: empty"))
	}
	add(ev.Validate(maxPayload))
	if len(problems) > 0 {
		r.Err = fmt.Errorf("outbox row seq %d (event_id %q): %s", r.Seq, r.EventID, strings.Join(problems, "; "))
	}
	return r, nil
}

// Querier is what the read functions need: a *sql.DB, *sql.Tx or *sql.Conn.
type Querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// ReadUnpublished returns up to limit unpublished rows with seq > afterSeq,
// in seq order. maxPayload is the payload limit used to validate rows (0 =
// DefaultMaxPayloadBytes).
func ReadUnpublished(ctx context.Context, q Querier, afterSeq int64, limit, maxPayload int) ([]Row, error) {
	rows, err := q.QueryContext(ctx, `SELECT `+rowColumns+` FROM warren_outbox INDEXED BY warren_outbox_unpublished
		WHERE published_at IS NULL AND seq > ? ORDER BY seq LIMIT ?`, afterSeq, limit)
	if err != nil {
		return nil, fmt.Errorf("read outbox: %w", err)
	}
	defer rows.Close()
	// Most reads, one per commit the relay is told of, find a few rows: a
	// slice of limit rows each time would be most of the relay's garbage.
	var out []Row
	for rows.Next() {
		r, err := scanRow(rows, maxPayload)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read outbox: %w", err)
	}
	return out, nil
}

// Get returns the row with seq, and false when there is none.
func Get(ctx context.Context, q Querier, seq int64, maxPayload int) (Row, bool, error) {
	row := q.QueryRowContext(ctx, `SELECT `+rowColumns+` FROM warren_outbox WHERE seq = ?`, seq)
	r, err := scanRow(row, maxPayload)
	if err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return Row{}, false, nil
		}
		return Row{}, false, err
	}
	return r, true, nil
}

// MarkPublished sets published_at on the rows with the given seqs in one
// short transaction. Call it only after the broker confirmed them. It waits
// for the write lock with sql.WriteTx, so that an application committing
// constantly does not keep it waiting for seconds, and commits without an
// fsync of its own (sql.WriteTxNoSync), so that it does not hold the lock
// the application waits for through one: a mark lost to a power loss
// publishes its rows again, and the consumers' inboxes drop the copies.
func MarkPublished(ctx context.Context, db *sql.DB, seqs []int64, at time.Time) error {
	if len(seqs) == 0 {
		return nil
	}
	ts := wsql.FormatTime(at)
	runs, singles := seqRuns(seqs)
	const chunk = 500
	err := wsql.WriteTxNoSync(ctx, db, wsql.DefaultBusyTimeout, func(tx *sql.Tx) error {
		// A run of consecutive seqs is one range of the rowid: a relay
		// marks whole runs of confirmed rows, and a range costs a fraction
		// of an IN list of the same rows.
		for _, r := range runs {
			if _, err := tx.ExecContext(ctx, `UPDATE warren_outbox SET published_at = ?
				WHERE seq BETWEEN ? AND ? AND published_at IS NULL`, ts, r[0], r[1]); err != nil {
				return err
			}
		}
		for start := 0; start < len(singles); start += chunk {
			part := singles[start:min(start+chunk, len(singles))]
			args := make([]any, 0, len(part)+1)
			args = append(args, ts)
			for _, s := range part {
				args = append(args, s)
			}
			q := `UPDATE warren_outbox SET published_at = ? WHERE published_at IS NULL AND seq IN (?` + strings.Repeat(",?", len(part)-1) + `)`
			if _, err := tx.ExecContext(ctx, q, args...); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("mark published: %w", err)
	}
	return nil
}

// seqRuns splits seqs into runs of at least minRun consecutive values
// ([first, last]) and the values outside such runs. Duplicates count once.
func seqRuns(seqs []int64) (runs [][2]int64, singles []int64) {
	const minRun = 4
	sorted := slices.Clone(seqs)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	for i := 0; i < len(sorted); {
		j := i + 1
		for j < len(sorted) && sorted[j] == sorted[j-1]+1 {
			j++
		}
		if j-i >= minRun {
			runs = append(runs, [2]int64{sorted[i], sorted[j-1]})
		} else {
			singles = append(singles, sorted[i:j]...)
		}
		i = j
	}
	return runs, singles
}

// DefaultPruneBatch is the largest batch Prune deletes in one transaction
// when it is given no batch size.
const DefaultPruneBatch = 1000

// Prune deletes published rows whose published_at is before before, and
// returns how many it deleted; unpublished rows are never touched. It
// deletes in short transactions of at most batch rows (default
// DefaultPruneBatch), fewer when a batch holds the write lock for more
// than a few tens of milliseconds, and rests between them, so that the
// application's writes wait for one short batch at most (see
// sql.PruneBatches). With dryRun it deletes nothing and returns how many
// rows it would delete.
func Prune(ctx context.Context, db *sql.DB, before time.Time, batch int, dryRun bool) (int64, error) {
	if batch < 0 {
		return 0, fmt.Errorf("prune outbox: batch size %d is negative", batch)
	}
	if batch == 0 {
		batch = DefaultPruneBatch
	}
	ts := wsql.FormatTime(before)
	if dryRun {
		var n int64
		err := db.QueryRowContext(ctx, `SELECT count(*) FROM warren_outbox INDEXED BY warren_outbox_published_at
			WHERE published_at IS NOT NULL AND published_at < ?`, ts).Scan(&n)
		if err != nil {
			return 0, fmt.Errorf("prune outbox: count: %w", err)
		}
		return n, nil
	}
	n, err := wsql.PruneBatches(ctx, batch, func(ctx context.Context, limit int) (int64, error) {
		res, err := db.ExecContext(ctx, `DELETE FROM warren_outbox WHERE seq IN (
			SELECT seq FROM warren_outbox INDEXED BY warren_outbox_published_at
			WHERE published_at IS NOT NULL AND published_at < ? LIMIT ?)`, ts, limit)
		if err != nil {
			return 0, err
		}
		return res.RowsAffected()
	})
	if err != nil {
		return n, fmt.Errorf("prune outbox: %w", err)
	}
	return n, nil
}

// ProducerStatus is the backlog of one producer.
type ProducerStatus struct {
	Producer string `json:"producer"`
	// Backlog counts rows not yet published.
	Backlog int64 `json:"backlog"`
	// OldestUnpublished is when the oldest unpublished row was appended
	// (zero when the backlog is empty).
	OldestUnpublished time.Time `json:"oldest_unpublished,omitzero"`
	// Published counts rows still kept after publishing.
	Published int64 `json:"published"`
	// LastPublished is the latest published_at (zero when none).
	LastPublished time.Time `json:"last_published,omitzero"`
}

// Backlog returns, per producer with unpublished rows, how many there are
// and when the oldest was appended (Backlog and OldestUnpublished; the
// other fields are zero). It reads only the partial index of unpublished
// rows and one row per producer, so its cost follows the backlog, not the
// table: this is what the backlog gauges read on every scrape.
func Backlog(ctx context.Context, q Querier) ([]ProducerStatus, error) {
	rows, err := q.QueryContext(ctx, `SELECT producer, count(*), min(seq) FROM warren_outbox INDEXED BY warren_outbox_unpublished
		WHERE published_at IS NULL GROUP BY producer`)
	if err != nil {
		return nil, fmt.Errorf("outbox backlog: %w", err)
	}
	var out []ProducerStatus
	var olds []int64
	for rows.Next() {
		var p sql.NullString
		var n, seq int64
		if err := rows.Scan(&p, &n, &seq); err != nil {
			rows.Close()
			return nil, fmt.Errorf("outbox backlog: %w", err)
		}
		out = append(out, ProducerStatus{Producer: p.String, Backlog: n})
		olds = append(olds, seq)
	}
	err = rows.Err()
	rows.Close()
	if err != nil {
		return nil, fmt.Errorf("outbox backlog: %w", err)
	}
	for i, seq := range olds {
		var created sql.NullString
		if err := q.QueryRowContext(ctx, `SELECT created_at FROM warren_outbox WHERE seq = ?`, seq).Scan(&created); err == nil {
			if t, err := wsql.ParseTime(created.String); err == nil {
				out[i].OldestUnpublished = t
			}
		} else if !errors.Is(err, sql.ErrNoRows) { // published meanwhile: no age
			return nil, fmt.Errorf("outbox backlog: %w", err)
		}
	}
	sortStatus(out)
	return out, nil
}

// Status returns the backlog per producer (see Backlog) and the published
// rows still kept. The published part counts the kept rows over their
// index, so it costs more than Backlog on a large table.
func Status(ctx context.Context, q Querier) ([]ProducerStatus, error) {
	byProducer := map[string]*ProducerStatus{}
	get := func(p string) *ProducerStatus {
		s := byProducer[p]
		if s == nil {
			s = &ProducerStatus{Producer: p}
			byProducer[p] = s
		}
		return s
	}
	backlog, err := Backlog(ctx, q)
	if err != nil {
		return nil, err
	}
	for _, b := range backlog {
		*get(b.Producer) = b
	}
	rows, err := q.QueryContext(ctx, `SELECT producer, count(*), max(published_at) FROM warren_outbox INDEXED BY warren_outbox_published_at
		WHERE published_at IS NOT NULL GROUP BY producer`)
	if err != nil {
		return nil, fmt.Errorf("outbox status: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var p, last sql.NullString
		var n int64
		if err := rows.Scan(&p, &n, &last); err != nil {
			return nil, fmt.Errorf("outbox status: %w", err)
		}
		s := get(p.String)
		s.Published = n
		if t, err := wsql.ParseTime(last.String); err == nil {
			s.LastPublished = t
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("outbox status: %w", err)
	}
	out := make([]ProducerStatus, 0, len(byProducer))
	for _, s := range byProducer {
		out = append(out, *s)
	}
	sortStatus(out)
	return out, nil
}

func sortStatus(s []ProducerStatus) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j].Producer < s[j-1].Producer; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// ListFilter selects rows for List.
type ListFilter struct {
	Producer    string // "" = all
	Unpublished bool   // only rows not yet published
	BeforeSeq   int64  // rows with seq < BeforeSeq (0 = from the newest): the cursor
	Limit       int    // default 20
}

// List returns the newest rows matching f, newest first.
func List(ctx context.Context, q Querier, f ListFilter) ([]Row, error) {
	if f.Limit <= 0 {
		f.Limit = 20
	}
	where := []string{"1 = 1"}
	var args []any
	if f.Producer != "" {
		where = append(where, "producer = ?")
		args = append(args, f.Producer)
	}
	if f.Unpublished {
		where = append(where, "published_at IS NULL")
	}
	if f.BeforeSeq > 0 {
		where = append(where, "seq < ?")
		args = append(args, f.BeforeSeq)
	}
	args = append(args, f.Limit)
	rows, err := q.QueryContext(ctx, `SELECT `+rowColumns+` FROM warren_outbox WHERE `+strings.Join(where, " AND ")+` ORDER BY seq DESC LIMIT ?`, args...)
	if err != nil {
		return nil, fmt.Errorf("list outbox: %w", err)
	}
	defer rows.Close()
	var out []Row
	for rows.Next() {
		r, err := scanRow(rows, 0)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list outbox: %w", err)
	}
	return out, nil
}
