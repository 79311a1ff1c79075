package consumer

import (
	"bytes"
	"context"
	dbsql "database/sql"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"go.opentelemetry.io/otel/propagation"

	"github.com/warrenmq/warren/inbox"
)

// Handler handles one delivery inside the inbox transaction. The consumer
// records the delivery as processed in tx; Handle does its own writes in tx
// too, and they commit together, after which the delivery is acked. A
// returned error (or a panic, or running past the handler timeout) rolls
// back Handle's writes alone and sends the delivery on the failure path:
// immediate retries, then retry queues, then the poison queue.
//
// Handle must not commit or roll back tx, and should honour ctx: its
// deadline is the handler timeout. Several Handle calls share one database
// transaction (each under a savepoint of its own) and run one after the
// other while SQLite's write lock is held, so Handle should be quick and
// must not wait on anything slow, such as the network: do that in a
// Preparer's Prepare, which runs before, outside the transaction.
type Handler interface {
	Handle(ctx context.Context, tx *dbsql.Tx, d *Delivery) error
}

// HandlerFunc adapts a function to a Handler.
type HandlerFunc func(ctx context.Context, tx *dbsql.Tx, d *Delivery) error

// Handle calls f.
func (f HandlerFunc) Handle(ctx context.Context, tx *dbsql.Tx, d *Delivery) error {
	return f(ctx, tx, d)
}

// Preparer is a Handler with a first phase that runs outside the database
// transaction: Prepare runs (concurrently with other deliveries, up to the
// concurrency, holding no lock) and only when it succeeds does Handle run
// in the transaction that records the delivery. Its error is a handler
// failure like Handle's. A delivery already processed skips Prepare (a
// check made before it, so a duplicate arriving while its first copy is in
// flight may still reach Prepare).
//
// If the process dies between Prepare and the commit, the delivery comes
// again and Prepare runs again: Prepare is at-least-once.
type Preparer interface {
	Handler
	Prepare(ctx context.Context, d *Delivery) error
}

// Inbox is the audit-only handler: it does nothing more than the inbox row
// the consumer records itself.
var Inbox Handler = inboxHandler{}

type inboxHandler struct{}

func (inboxHandler) Handle(context.Context, *dbsql.Tx, *Delivery) error { return nil }
func (inboxHandler) builtin()                                           {}

// builtinHandler marks this package's handlers, whose Handle does nothing:
// the committer records their deliveries without a savepoint or a
// goroutine for the handler.
type builtinHandler interface{ builtin() }

// httpSink POSTs each delivery as the contract's JSON.
type httpSink struct {
	url    string
	client *http.Client
	binary bool
}

var _ Preparer = (*httpSink)(nil)

// HTTPSink returns a handler that POSTs each delivery to url as the
// contract's "delivery as JSON" (Content-Type application/json; headers
// Warren-Message-Id, Warren-Consumer and Warren-Attempt too). A 2xx answer
// is success; any other status, a network error or the handler timeout is
// a failure whose error names the status and the start of the answer.
// binary sends every body in base64. client nil means a client with no
// timeout of its own (the handler timeout bounds each POST).
//
// The POST is made in Prepare, outside the database transaction; the inbox
// row is recorded after it. A crash between the two repeats the POST when
// the delivery comes again: the endpoint sees each delivery at least once
// and deduplicates with the JSON's properties.messageId.
func HTTPSink(url string, client *http.Client, binary bool) Handler {
	if client == nil {
		client = &http.Client{}
	}
	return &httpSink{url: url, client: client, binary: binary}
}

// Prepare POSTs the delivery.
func (s *httpSink) Prepare(ctx context.Context, d *Delivery) error {
	body, err := inbox.ToJSON(&d.Delivery, s.binary)
	if err != nil {
		return fmt.Errorf("http sink: encode delivery %s: %w", d.MessageID, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("http sink: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Warren-Message-Id", d.MessageID)
	req.Header.Set("Warren-Consumer", d.Consumer)
	req.Header.Set("Warren-Attempt", fmt.Sprint(d.Attempt))
	propagation.TraceContext{}.Inject(ctx, propagation.HeaderCarrier(req.Header)) // the delivery's trace, when traced
	start := time.Now()
	resp, err := s.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("http sink: POST %s: no answer within %s: %w", s.url, time.Since(start).Round(time.Millisecond), ctx.Err())
		}
		return fmt.Errorf("http sink: POST %s: %w", s.url, err)
	}
	defer resp.Body.Close()
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20)) // let the connection be reused
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("http sink: POST %s: status %d %s: %s", s.url, resp.StatusCode, http.StatusText(resp.StatusCode), strings.TrimSpace(string(snippet)))
	}
	return nil
}

// Handle does nothing more: the consumer records the inbox row.
func (s *httpSink) Handle(context.Context, *dbsql.Tx, *Delivery) error { return nil }

func (s *httpSink) builtin() {}
