package inbox

import (
	"context"
	dbsql "database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	wsql "github.com/warrenmq/warren/sql"
)

// Entry is one inbox row: the delivery as first received and what became
// of it.
type Entry struct {
	Delivery
	Status     Status
	Attempts   int    // handler runs so far
	Duplicates int    // duplicate deliveries acked without running the handler
	LastError  string // the last handler error or poison reason, if any
	// ProcessedAt is when the handler's transaction committed; zero unless
	// processed.
	ProcessedAt time.Time
}

// ErrNotFound is returned by Show when there is no such row.
var ErrNotFound = errors.New("no such inbox entry")

// ErrBadCursor is returned by List for a cursor it did not hand out.
var ErrBadCursor = errors.New("invalid inbox cursor")

// List defaults.
const (
	// DefaultListLimit is the page size when Filter.Limit is 0.
	DefaultListLimit = 100
	// MaxListLimit caps Filter.Limit.
	MaxListLimit = 10000
)

// Filter selects inbox rows for List. Zero fields do not filter. Every
// value is compared literally (bound as a parameter): quotes, % and _ have
// no special meaning.
type Filter struct {
	Consumer      string
	Status        Status
	EventType     string
	AggregateType string
	AggregateID   string
	// Since and Until bound first_received_at: Since <= t < Until.
	Since, Until time.Time
	// Limit is the page size. Default DefaultListLimit; at most MaxListLimit.
	Limit int
	// Cursor continues a previous List: pass its Page.Next.
	Cursor string
	// Oldest lists oldest first. Default: newest first.
	Oldest bool
	// WithBody also reads the bodies (List leaves Body nil otherwise).
	WithBody bool
}

// Page is one page of List.
type Page struct {
	Entries []Entry
	// Next is the cursor of the following page; empty on the last page.
	Next string
}

// cursor is the keyset position after the last row of a page.
type cursor struct {
	At       string `json:"t"`
	Consumer string `json:"c"`
	ID       string `json:"m"`
}

func encodeCursor(e *Entry) string {
	b, _ := json.Marshal(cursor{At: wsql.FormatTime(e.ReceivedAt), Consumer: e.Consumer, ID: e.MessageID})
	return base64.RawURLEncoding.EncodeToString(b)
}

func decodeCursor(s string) (cursor, error) {
	var c cursor
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || json.Unmarshal(b, &c) != nil || c.At == "" {
		return cursor{}, ErrBadCursor
	}
	if _, err := wsql.ParseTime(c.At); err != nil {
		return cursor{}, ErrBadCursor
	}
	return c, nil
}

const selectColumns = `consumer, message_id, producer, exchange, routing_key, event_type,
	aggregate_type, aggregate_id, aggregate_version, content_type, headers, properties,
	status, attempts, duplicates, last_error, first_received_at, processed_at`

// List returns a page of inbox rows matching f, newest first (or oldest
// first with f.Oldest), ordered by first_received_at then consumer and
// message id. Pages are cut by keyset on that order, so rows inserted
// while paging never shift a page; every row present throughout is
// returned exactly once.
func List(ctx context.Context, q Querier, f Filter) (Page, error) {
	limit := f.Limit
	switch {
	case limit == 0:
		limit = DefaultListLimit
	case limit < 0:
		return Page{}, fmt.Errorf("inbox list: limit %d is negative", limit)
	case limit > MaxListLimit:
		limit = MaxListLimit
	}
	if f.Status != "" && !f.Status.Valid() {
		return Page{}, fmt.Errorf("inbox list: status %q is not one of processed, retrying, poisoned", f.Status)
	}
	var where []string
	var args []any
	add := func(cond string, v ...any) {
		where = append(where, cond)
		args = append(args, v...)
	}
	if f.Consumer != "" {
		add(`consumer = ?`, f.Consumer)
	}
	if f.Status != "" {
		add(`status = ?`, string(f.Status))
	}
	if f.EventType != "" {
		add(`event_type = ?`, f.EventType)
	}
	if f.AggregateType != "" {
		add(`aggregate_type = ?`, f.AggregateType)
	}
	if f.AggregateID != "" {
		add(`aggregate_id = ?`, f.AggregateID)
	}
	if !f.Since.IsZero() {
		add(`first_received_at >= ?`, wsql.FormatTime(f.Since))
	}
	if !f.Until.IsZero() {
		add(`first_received_at < ?`, wsql.FormatTime(f.Until))
	}
	order, cmp := "DESC", "<"
	if f.Oldest {
		order, cmp = "ASC", ">"
	}
	if f.Cursor != "" {
		c, err := decodeCursor(f.Cursor)
		if err != nil {
			return Page{}, err
		}
		add(`(first_received_at, consumer, message_id) `+cmp+` (?, ?, ?)`, c.At, c.Consumer, c.ID)
	}
	body := `NULL`
	if f.WithBody {
		body = `body`
	}
	query := `SELECT ` + selectColumns + `, ` + body + ` FROM warren_inbox`
	if len(where) > 0 {
		query += ` WHERE ` + strings.Join(where, ` AND `)
	}
	query += ` ORDER BY first_received_at ` + order + `, consumer ` + order + `, message_id ` + order + ` LIMIT ?`
	args = append(args, limit+1)

	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return Page{}, fmt.Errorf("inbox list: %w", err)
	}
	defer rows.Close()
	var page Page
	for rows.Next() {
		e, err := scanEntry(rows)
		if err != nil {
			return Page{}, fmt.Errorf("inbox list: %w", err)
		}
		page.Entries = append(page.Entries, e)
	}
	if err := rows.Err(); err != nil {
		return Page{}, fmt.Errorf("inbox list: %w", err)
	}
	if len(page.Entries) > limit {
		page.Entries = page.Entries[:limit]
		page.Next = encodeCursor(&page.Entries[limit-1])
	}
	return page, nil
}

// Show returns the row of (consumer, messageID) with its body, or
// ErrNotFound.
func Show(ctx context.Context, q Querier, consumer, messageID string) (Entry, error) {
	rows, err := q.QueryContext(ctx, `SELECT `+selectColumns+`, body FROM warren_inbox WHERE consumer = ? AND message_id = ?`, consumer, messageID)
	if err != nil {
		return Entry{}, fmt.Errorf("inbox show %s/%s: %w", consumer, messageID, err)
	}
	defer rows.Close()
	if !rows.Next() {
		if err := rows.Err(); err != nil {
			return Entry{}, fmt.Errorf("inbox show %s/%s: %w", consumer, messageID, err)
		}
		return Entry{}, fmt.Errorf("inbox show %s/%s: %w", consumer, messageID, ErrNotFound)
	}
	e, err := scanEntry(rows)
	if err != nil {
		return Entry{}, fmt.Errorf("inbox show %s/%s: %w", consumer, messageID, err)
	}
	return e, nil
}

func scanEntry(rows *dbsql.Rows) (Entry, error) {
	var (
		e                                   Entry
		aggType, aggID, lastErr, processed  dbsql.NullString
		aggVersion                          dbsql.NullInt64
		headers, props, status, firstReceiv string
		body                                []byte
	)
	err := rows.Scan(&e.Consumer, &e.MessageID, &e.Producer, &e.Exchange, &e.RoutingKey, &e.EventType,
		&aggType, &aggID, &aggVersion, &e.ContentType, &headers, &props,
		&status, &e.Attempts, &e.Duplicates, &lastErr, &firstReceiv, &processed, &body)
	if err != nil {
		return Entry{}, err
	}
	e.AggregateType, e.AggregateID, e.LastError = aggType.String, aggID.String, lastErr.String
	if aggVersion.Valid {
		v := aggVersion.Int64
		e.AggregateVersion = &v
	}
	e.Status = Status(status)
	e.Body = body
	if headers != "" && headers != "{}" {
		if err := json.Unmarshal([]byte(headers), &e.Headers); err != nil {
			return Entry{}, fmt.Errorf("row %s/%s: headers are not a JSON object of strings: %w", e.Consumer, e.MessageID, err)
		}
	}
	if props != "" && props != "{}" {
		var p Properties
		if err := json.Unmarshal([]byte(props), &p); err != nil {
			return Entry{}, fmt.Errorf("row %s/%s: properties are not the contract's JSON: %w", e.Consumer, e.MessageID, err)
		}
		e.setProperties(p)
	}
	if e.ReceivedAt, err = wsql.ParseTime(firstReceiv); err != nil {
		return Entry{}, fmt.Errorf("row %s/%s: first_received_at: %w", e.Consumer, e.MessageID, err)
	}
	if processed.Valid {
		if e.ProcessedAt, err = wsql.ParseTime(processed.String); err != nil {
			return Entry{}, fmt.Errorf("row %s/%s: processed_at: %w", e.Consumer, e.MessageID, err)
		}
	}
	return e, nil
}

// Summary is what Stats reports on the inbox of one consumer ("" for all).
type Summary struct {
	Consumer    string
	Total       int64
	ByStatus    map[Status]int64 // every status, zero counts included
	ByEventType map[string]int64
	// Duplicates is how many duplicate deliveries were absorbed (acked
	// without running the handler).
	Duplicates int64
	// Oldest and Newest are the first and last first_received_at; zero
	// when the inbox is empty.
	Oldest, Newest time.Time
}

// Stats counts the rows of consumer ("" for every consumer) by status and
// by event type, sums the duplicates absorbed and finds the oldest and
// newest rows.
func Stats(ctx context.Context, q Querier, consumer string) (Summary, error) {
	st := Summary{
		Consumer:    consumer,
		ByStatus:    map[Status]int64{StatusProcessed: 0, StatusRetrying: 0, StatusPoisoned: 0},
		ByEventType: map[string]int64{},
	}
	where, args := `1 = 1`, []any(nil)
	if consumer != "" {
		where, args = `consumer = ?`, []any{consumer}
	}
	fail := func(err error) (Summary, error) { return Summary{}, fmt.Errorf("inbox stats %s: %w", consumer, err) }

	var dups dbsql.NullInt64
	var oldest, newest dbsql.NullString
	err := q.QueryRowContext(ctx, `SELECT count(*), sum(duplicates), min(first_received_at), max(first_received_at)
		FROM warren_inbox WHERE `+where, args...).Scan(&st.Total, &dups, &oldest, &newest)
	if err != nil {
		return fail(err)
	}
	st.Duplicates = dups.Int64
	if oldest.Valid {
		if st.Oldest, err = wsql.ParseTime(oldest.String); err != nil {
			return fail(err)
		}
		if st.Newest, err = wsql.ParseTime(newest.String); err != nil {
			return fail(err)
		}
	}
	count := func(column string, put func(string, int64)) error {
		rows, err := q.QueryContext(ctx, `SELECT `+column+`, count(*) FROM warren_inbox WHERE `+where+` GROUP BY `+column, args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var k string
			var n int64
			if err := rows.Scan(&k, &n); err != nil {
				return err
			}
			put(k, n)
		}
		return rows.Err()
	}
	if err := count(`status`, func(k string, n int64) { st.ByStatus[Status(k)] = n }); err != nil {
		return fail(err)
	}
	if err := count(`event_type`, func(k string, n int64) { st.ByEventType[k] = n }); err != nil {
		return fail(err)
	}
	return st, nil
}

// DefaultPruneBatch is the largest batch Prune deletes in one transaction
// when it is given no batch size.
const DefaultPruneBatch = 1000

// Prune deletes the processed rows of consumer ("" for every consumer)
// whose processed_at is before olderThan, and returns how many it deleted.
// Poisoned and retrying rows are kept: they are the record of what failed.
// It deletes in short transactions of at most batchSize rows (default
// DefaultPruneBatch), fewer when a batch holds the write lock for more than
// a few tens of milliseconds, and rests between them, so that the
// application's writes wait for one short batch at most (see
// sql.PruneBatches). With dryRun it deletes nothing and returns how many
// rows it would delete.
//
// A pruned message id is no longer deduplicated: a redelivery of it after
// the prune runs the handler again. Keep rows for longer than any
// redelivery can take.
func Prune(ctx context.Context, db *dbsql.DB, consumer string, olderThan time.Time, batchSize int, dryRun bool) (int64, error) {
	if batchSize < 0 {
		return 0, fmt.Errorf("inbox prune: batch size %d is negative", batchSize)
	}
	if batchSize == 0 {
		batchSize = DefaultPruneBatch
	}
	cut := wsql.FormatTime(olderThan)
	// One consumer's rows are read over (consumer, status,
	// first_received_at), so that other consumers' rows, which may be kept
	// longer, are not read again for every batch: a row processed before
	// the cut was received before it. Every consumer's rows are read over
	// the partial index of processed rows by processed_at.
	from, where, args := `warren_inbox INDEXED BY warren_inbox_prune`, `status = 'processed' AND processed_at < ?`, []any{cut}
	if consumer != "" {
		from = `warren_inbox INDEXED BY warren_inbox_status`
		where = `consumer = ? AND status = 'processed' AND first_received_at < ? AND processed_at < ?`
		args = []any{consumer, cut, cut}
	}
	if dryRun {
		var n int64
		if err := db.QueryRowContext(ctx, `SELECT count(*) FROM `+from+` WHERE `+where, args...).Scan(&n); err != nil {
			return 0, fmt.Errorf("inbox prune: count: %w", err)
		}
		return n, nil
	}
	n, err := wsql.PruneBatches(ctx, batchSize, func(ctx context.Context, limit int) (int64, error) {
		res, err := db.ExecContext(ctx, `DELETE FROM warren_inbox WHERE (consumer, message_id) IN (
			SELECT consumer, message_id FROM `+from+` WHERE `+where+` LIMIT ?)`, append(args, limit)...)
		if err != nil {
			return 0, err
		}
		return res.RowsAffected()
	})
	if err != nil {
		return n, fmt.Errorf("inbox prune: %w", err)
	}
	return n, nil
}

// Consumers returns the consumers that have rows in the inbox, in name
// order. It steps through the primary key, one lookup per consumer, so it
// stays cheap however many rows there are.
func Consumers(ctx context.Context, q Querier) ([]string, error) {
	rows, err := q.QueryContext(ctx, `WITH RECURSIVE c(name) AS (
			SELECT (SELECT min(consumer) FROM warren_inbox)
			UNION ALL
			SELECT (SELECT min(consumer) FROM warren_inbox WHERE consumer > c.name) FROM c WHERE c.name IS NOT NULL)
		SELECT name FROM c WHERE name IS NOT NULL`)
	if err != nil {
		return nil, fmt.Errorf("inbox consumers: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, fmt.Errorf("inbox consumers: %w", err)
		}
		out = append(out, name)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("inbox consumers: %w", err)
	}
	return out, nil
}

// ConsumerOverview is what `warren status` shows of one consumer's inbox.
type ConsumerOverview struct {
	Consumer string `json:"consumer"`
	// Retrying and Poisoned count the rows with that status.
	Retrying int64 `json:"retrying"`
	Poisoned int64 `json:"poisoned"`
	// LastReceived is the latest first_received_at (zero when none).
	LastReceived time.Time `json:"last_received,omitzero"`
	// LastError is the error of the most recently received delivery that
	// is retrying or poisoned now; LastErrorID is its message id and
	// LastErrorAt when it was received. Empty when nothing is failing.
	LastError   string    `json:"last_error,omitempty"`
	LastErrorID string    `json:"last_error_message_id,omitempty"`
	LastErrorAt time.Time `json:"last_error_received_at,omitzero"`
}

// Overview returns how many of consumer's rows are retrying and poisoned,
// the last error and when the last delivery arrived. Every query reads a
// narrow range of an index: processed rows are not counted.
func Overview(ctx context.Context, q Querier, consumer string) (ConsumerOverview, error) {
	st := ConsumerOverview{Consumer: consumer}
	fail := func(err error) (ConsumerOverview, error) {
		return ConsumerOverview{}, fmt.Errorf("inbox overview %s: %w", consumer, err)
	}
	var last dbsql.NullString
	if err := q.QueryRowContext(ctx, `SELECT max(first_received_at) FROM warren_inbox WHERE consumer = ?`, consumer).Scan(&last); err != nil {
		return fail(err)
	}
	if last.Valid {
		t, err := wsql.ParseTime(last.String)
		if err != nil {
			return fail(err)
		}
		st.LastReceived = t
	}
	for _, s := range []Status{StatusRetrying, StatusPoisoned} {
		var n int64
		if err := q.QueryRowContext(ctx, `SELECT count(*) FROM warren_inbox WHERE consumer = ? AND status = ?`, consumer, string(s)).Scan(&n); err != nil {
			return fail(err)
		}
		if s == StatusRetrying {
			st.Retrying = n
		} else {
			st.Poisoned = n
		}
		if n == 0 {
			continue
		}
		var id, at string
		var msg dbsql.NullString
		err := q.QueryRowContext(ctx, `SELECT message_id, last_error, first_received_at FROM warren_inbox INDEXED BY warren_inbox_status
			WHERE consumer = ? AND status = ? ORDER BY first_received_at DESC LIMIT 1`, consumer, string(s)).Scan(&id, &msg, &at)
		if err != nil {
			return fail(err)
		}
		t, err := wsql.ParseTime(at)
		if err != nil {
			return fail(err)
		}
		if t.After(st.LastErrorAt) || st.LastErrorID == "" {
			st.LastError, st.LastErrorID, st.LastErrorAt = msg.String, id, t
		}
	}
	return st, nil
}
