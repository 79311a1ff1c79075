package inbox_test

import (
	"bytes"
	"context"
	dbsql "database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/warrenmq/warren/inbox"
	wsql "github.com/warrenmq/warren/sql"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type testBundle struct {
	db *dbsql.DB
}

func setup(t *testing.T) *testBundle {
	t.Helper()
	ctx := context.Background()
	db, err := wsql.Open(ctx, filepath.Join(t.TempDir(), "inbox.db"), wsql.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	_, err = wsql.Migrate(ctx, db)
	require.NoError(t, err)
	return &testBundle{db: db}
}

func delivery(consumer, id string) *inbox.Delivery {
	v := int64(7)
	return &inbox.Delivery{
		Consumer: consumer, MessageID: id, Producer: "crm", Exchange: "crm.events",
		RoutingKey: "company.updated", EventType: "company.updated",
		AggregateType: "company", AggregateID: "42", AggregateVersion: &v,
		ContentType: "application/json", CorrelationID: "corr-1", DeliveryMode: 2,
		Timestamp:  time.Unix(1_700_000_000, 0).UTC(),
		Headers:    map[string]string{"aggregate-id": "42", "traceparent": "00-abc-def-01"},
		Body:       []byte(`{"name":"Acme"}`),
		ReceivedAt: time.Now(),
	}
}

func inTx(t *testing.T, db *dbsql.DB, f func(tx *dbsql.Tx) error) {
	t.Helper()
	tx, err := db.BeginTx(context.Background(), nil)
	require.NoError(t, err)
	if err := f(tx); err != nil {
		require.NoError(t, tx.Rollback())
		return
	}
	require.NoError(t, tx.Commit())
}

func TestMarkProcessed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("FirstClaimWinsThenDuplicates", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		d := delivery("billing", "m-1")
		inTx(t, b.db, func(tx *dbsql.Tx) error {
			fresh, err := inbox.MarkProcessed(ctx, tx, d, 1)
			require.NoError(t, err)
			require.True(t, fresh)
			done, err := inbox.Processed(ctx, tx, "billing", "m-1")
			require.NoError(t, err)
			require.True(t, done)
			return nil
		})
		for range 4 {
			inTx(t, b.db, func(tx *dbsql.Tx) error {
				fresh, err := inbox.MarkProcessed(ctx, tx, d, 1)
				require.NoError(t, err)
				require.False(t, fresh)
				require.NoError(t, inbox.RecordDuplicate(ctx, tx, "billing", "m-1"))
				return nil
			})
		}
		e, err := inbox.Show(ctx, b.db, "billing", "m-1")
		require.NoError(t, err)
		require.Equal(t, inbox.StatusProcessed, e.Status)
		require.Equal(t, 1, e.Attempts)
		require.Equal(t, 4, e.Duplicates)
		require.False(t, e.ProcessedAt.IsZero())
	})

	t.Run("RollbackUndoesTheClaim", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		d := delivery("billing", "m-2")
		inTx(t, b.db, func(tx *dbsql.Tx) error {
			fresh, err := inbox.MarkProcessed(ctx, tx, d, 1)
			require.NoError(t, err)
			require.True(t, fresh)
			return errors.New("handler failed")
		})
		done, err := inbox.Processed(ctx, b.db, "billing", "m-2")
		require.NoError(t, err)
		require.False(t, done)
	})

	t.Run("FailuresThenSuccess", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		d := delivery("billing", "m-3")
		require.NoError(t, inbox.RecordFailure(ctx, b.db, d, 1, errors.New("boom\nsecond line"), inbox.StatusRetrying))
		require.NoError(t, inbox.RecordFailure(ctx, b.db, d, 2, errors.New("boom again"), inbox.StatusRetrying))
		e, err := inbox.Show(ctx, b.db, "billing", "m-3")
		require.NoError(t, err)
		require.Equal(t, inbox.StatusRetrying, e.Status)
		require.Equal(t, 2, e.Attempts)
		require.Equal(t, "boom again", e.LastError)

		// A crash redelivery the inbox never saw counts through attempt.
		fresh, err := inbox.MarkProcessed(ctx, b.db, d, 4)
		require.NoError(t, err)
		require.True(t, fresh)
		e, err = inbox.Show(ctx, b.db, "billing", "m-3")
		require.NoError(t, err)
		require.Equal(t, inbox.StatusProcessed, e.Status)
		require.Equal(t, 4, e.Attempts)
		require.Equal(t, "boom again", e.LastError, "the last error stays for the audit")

		// A processed row is never downgraded.
		require.NoError(t, inbox.RecordFailure(ctx, b.db, d, 5, errors.New("late"), inbox.StatusPoisoned))
		require.NoError(t, inbox.RecordPoisoned(ctx, b.db, d, 5, "expired", true))
		e, err = inbox.Show(ctx, b.db, "billing", "m-3")
		require.NoError(t, err)
		require.Equal(t, inbox.StatusProcessed, e.Status)

		require.Error(t, inbox.RecordFailure(ctx, b.db, d, 1, errors.New("x"), inbox.StatusProcessed))
	})

	t.Run("RedriveAfterPoisonCountsOn", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		d := delivery("billing", "m-4")
		for i := 1; i <= 4; i++ {
			require.NoError(t, inbox.RecordFailure(ctx, b.db, d, i, errors.New("boom"), inbox.StatusRetrying))
		}
		require.NoError(t, inbox.RecordFailure(ctx, b.db, d, 5, errors.New("boom"), inbox.StatusPoisoned))
		fresh, err := inbox.MarkProcessed(ctx, b.db, d, 1) // redriven: the header count starts again
		require.NoError(t, err)
		require.True(t, fresh)
		e, err := inbox.Show(ctx, b.db, "billing", "m-4")
		require.NoError(t, err)
		require.Equal(t, inbox.StatusProcessed, e.Status)
		require.Equal(t, 6, e.Attempts)
	})

	t.Run("PoisonedWithoutBody", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		d := delivery("billing", "m-5")
		d.Body = make([]byte, 1<<20)
		require.NoError(t, inbox.RecordPoisoned(ctx, b.db, d, 0, "too-large", false))
		e, err := inbox.Show(ctx, b.db, "billing", "m-5")
		require.NoError(t, err)
		require.Equal(t, inbox.StatusPoisoned, e.Status)
		require.Equal(t, "too-large", e.LastError)
		require.Nil(t, e.Body)
	})

	t.Run("NeedsAnID", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		_, err := inbox.MarkProcessed(ctx, b.db, delivery("billing", ""), 1)
		require.Error(t, err)
	})
}

func TestErrorLine(t *testing.T) {
	t.Parallel()
	require.Equal(t, "a b c", inbox.ErrorLine(errors.New("a\nb\r\n\tc")))
	long := inbox.ErrorLine(errors.New(string(make([]byte, 0)) + fmt.Sprintf("%02000d", 1) + "é"))
	require.LessOrEqual(t, len(long), inbox.MaxErrorBytes)
	require.Equal(t, "", inbox.ErrorLine(nil))
	u := inbox.ErrorLine(errors.New(string(append([]byte("bad "), 0xff))))
	require.Equal(t, "bad \uFFFD", u)
}

func TestShowRoundTrip(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	d := delivery("billing", "m-1")
	d.ContentEncoding, d.ReplyTo, d.Expiration, d.UserID, d.Priority = "gzip", "reply", "60000", "guest", 3
	_, err := inbox.MarkProcessed(ctx, b.db, d, 1)
	require.NoError(t, err)

	e, err := inbox.Show(ctx, b.db, "billing", "m-1")
	require.NoError(t, err)
	want := *d
	want.ReceivedAt = e.ReceivedAt
	require.WithinDuration(t, d.ReceivedAt, e.ReceivedAt, time.Millisecond)
	require.Equal(t, want, e.Delivery)

	_, err = inbox.Show(ctx, b.db, "billing", "nope")
	require.ErrorIs(t, err, inbox.ErrNotFound)
}

func TestToJSON(t *testing.T) {
	t.Parallel()
	d := delivery("billing", "0192b3a4-0000-7000-8000-000000000001")
	d.DeliveryTag, d.Redelivered = 9, true
	d.Body = []byte(`{"name":"<Acme & Co>"}`)
	got, err := inbox.ToJSON(d, false)
	require.NoError(t, err)
	require.JSONEq(t, `{
	  "body": "{\"name\":\"<Acme & Co>\"}",
	  "properties": {"appId": "crm", "contentType": "application/json", "contentEncoding": "",
	    "correlationId": "corr-1", "deliveryMode": 2, "expiration": "", "messageId": "0192b3a4-0000-7000-8000-000000000001",
	    "priority": 0, "replyTo": "", "type": "company.updated", "userId": "", "timestamp": 1700000000},
	  "headers": {"aggregate-id": "42", "traceparent": "00-abc-def-01"},
	  "envelope": {"deliveryTag": 9, "exchange": "crm.events", "routingKey": "company.updated", "redelivered": true}
	}`, string(got))
	require.Contains(t, string(got), `<Acme & Co>`, "no HTML escaping")

	// Key order of the contract.
	var keys []string
	dec := json.NewDecoder(bytes.NewReader(got))
	_, _ = dec.Token()
	for dec.More() {
		k, _ := dec.Token()
		keys = append(keys, k.(string))
		var skip json.RawMessage
		require.NoError(t, dec.Decode(&skip))
	}
	require.Equal(t, []string{"body", "properties", "headers", "envelope"}, keys)

	d.Body = []byte{0xff, 0x00, 0x01}
	got, err = inbox.ToJSON(d, false)
	require.NoError(t, err)
	var j inbox.DeliveryJSON
	require.NoError(t, json.Unmarshal(got, &j))
	require.Equal(t, "/wAB", j.Body)

	d.Body = []byte("plain text")
	got, err = inbox.ToJSON(d, true)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(got, &j))
	require.Equal(t, "cGxhaW4gdGV4dA==", j.Body)

	d.Headers = nil
	got, err = inbox.ToJSON(d, false)
	require.NoError(t, err)
	require.Contains(t, string(got), `"headers":{}`)
}

func TestRecordStarted(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	d := delivery("billing", "m-1")
	lookup := func() inbox.State {
		t.Helper()
		st, found, err := inbox.Lookup(ctx, b.db, "billing", "m-1")
		require.NoError(t, err)
		require.True(t, found)
		return st
	}

	_, found, err := inbox.Lookup(ctx, b.db, "billing", "m-1")
	require.NoError(t, err)
	require.False(t, found)

	// A run that started and never finished counts for the next one.
	require.NoError(t, inbox.RecordStarted(ctx, b.db, d, 1))
	require.Equal(t, inbox.State{Status: inbox.StatusRetrying, Attempts: 0, LastAttempt: 1}, lookup())
	require.NoError(t, inbox.RecordStarted(ctx, b.db, d, 2))
	require.Equal(t, inbox.State{Status: inbox.StatusRetrying, Attempts: 0, LastAttempt: 2}, lookup())

	// So does a failed one.
	require.NoError(t, inbox.RecordFailure(ctx, b.db, d, 3, errors.New("boom"), inbox.StatusRetrying))
	require.Equal(t, inbox.State{Status: inbox.StatusRetrying, Attempts: 3, LastAttempt: 3}, lookup())

	// Poisoning starts the count over (for a redrive), not the audit count.
	require.NoError(t, inbox.RecordFailure(ctx, b.db, d, 4, errors.New("boom"), inbox.StatusPoisoned))
	require.Equal(t, inbox.State{Status: inbox.StatusPoisoned, Attempts: 4, LastAttempt: 0}, lookup())

	require.NoError(t, inbox.RecordStarted(ctx, b.db, d, 1))
	require.Equal(t, inbox.State{Status: inbox.StatusRetrying, Attempts: 4, LastAttempt: 1}, lookup())
	_, err = inbox.MarkProcessed(ctx, b.db, d, 1)
	require.NoError(t, err)
	require.Equal(t, inbox.State{Status: inbox.StatusProcessed, Attempts: 5, LastAttempt: 0}, lookup())

	// Never on a processed row.
	require.NoError(t, inbox.RecordStarted(ctx, b.db, d, 9))
	require.Equal(t, inbox.State{Status: inbox.StatusProcessed, Attempts: 5, LastAttempt: 0}, lookup())

	require.NoError(t, inbox.RecordPoisoned(ctx, b.db, delivery("billing", "m-2"), 5, "expired", true))
	st, _, err := inbox.Lookup(ctx, b.db, "billing", "m-2")
	require.NoError(t, err)
	require.Equal(t, inbox.State{Status: inbox.StatusPoisoned, Attempts: 5, LastAttempt: 0}, st)
}
