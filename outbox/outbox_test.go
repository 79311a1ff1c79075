package outbox_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/test/testenv"
)

func event(aggID string) outbox.Event {
	return outbox.Event{
		Producer: "crm", Type: "company.updated",
		AggregateType: "company", AggregateID: aggID, AggregateVersion: outbox.Version(3),
		Headers:       map[string]string{"tenant": "acme"},
		CorrelationID: "corr-1", Expiration: 1500 * time.Millisecond, Traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		Payload: []byte(`{"name":"Acme"}`),
	}
}

func TestAppendCommitsAndRollsBackWithTheCaller(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, _ := testenv.DB(t)
	_, err := db.Exec(`CREATE TABLE company (id TEXT PRIMARY KEY, name TEXT)`)
	require.NoError(t, err)

	// Rolled back: neither the business row nor the event exists.
	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = tx.Exec(`INSERT INTO company VALUES ('1', 'Acme')`)
	require.NoError(t, err)
	_, err = outbox.Append(ctx, tx, event("1"))
	require.NoError(t, err)
	require.NoError(t, tx.Rollback())
	rows, err := outbox.ReadUnpublished(ctx, db, 0, 10, 0)
	require.NoError(t, err)
	require.Empty(t, rows)

	// Committed: both exist, the event with every field.
	tx, err = db.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = tx.Exec(`INSERT INTO company VALUES ('1', 'Acme')`)
	require.NoError(t, err)
	ids, err := outbox.Append(ctx, tx, event("1"), event("1"))
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	require.Len(t, ids, 2)
	u, err := uuid.Parse(ids[0])
	require.NoError(t, err)
	require.Equal(t, uuid.Version(7), u.Version())

	rows, err = outbox.ReadUnpublished(ctx, db, 0, 10, 0)
	require.NoError(t, err)
	require.Len(t, rows, 2)
	r := rows[0]
	require.NoError(t, r.Err)
	require.Equal(t, ids[0], r.EventID)
	require.Less(t, rows[0].Seq, rows[1].Seq)
	require.Equal(t, "crm", r.Producer)
	require.Equal(t, "company.updated", r.EventType)
	require.Equal(t, "company", r.AggregateType)
	require.Equal(t, "1", r.AggregateID)
	require.Equal(t, int64(3), *r.AggregateVersion)
	require.Equal(t, "application/json", r.ContentType)
	require.Equal(t, map[string]string{"tenant": "acme"}, r.Headers)
	require.Equal(t, "corr-1", r.CorrelationID)
	require.Equal(t, "1500", r.Expiration)
	require.Equal(t, `{"name":"Acme"}`, string(r.Payload))
	require.WithinDuration(t, time.Now(), r.CreatedAt, 5*time.Second)
	require.Nil(t, r.PublishedAt)
}

func TestAppendValidation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, _ := testenv.DB(t)
	small, err := outbox.New(outbox.Config{MaxPayloadBytes: 10})
	require.NoError(t, err)

	cases := []struct {
		name string
		mod  func(*outbox.Event)
		want string
	}{
		{"bad producer", func(e *outbox.Event) { e.Producer = "CRM Service" }, "not an application name"},
		{"empty producer", func(e *outbox.Event) { e.Producer = "" }, "producer"},
		{"empty type", func(e *outbox.Event) { e.Type = " " }, "type: empty"},
		{"nil payload", func(e *outbox.Event) { e.Payload = nil }, "payload"},
		{"reserved header", func(e *outbox.Event) { e.Headers = map[string]string{"x-death": "1"} }, "belong to RabbitMQ"},
		{"aggregate header", func(e *outbox.Event) { e.Headers = map[string]string{"aggregate-id": "1"} }, "set Event.AggregateID"},
		{"long correlation id", func(e *outbox.Event) { e.CorrelationID = strings.Repeat("c", 256) }, "correlation_id"},
		{"negative expiration", func(e *outbox.Event) { e.Expiration = -time.Second }, "negative"},
	}
	for _, c := range cases {
		ev := event("1")
		c.mod(&ev)
		_, err := outbox.AppendDB(ctx, db, ev)
		require.ErrorIs(t, err, outbox.ErrInvalidEvent, c.name)
		require.ErrorContains(t, err, c.want, c.name)
	}
	_, err = small.AppendDB(ctx, db, event("1"))
	require.ErrorIs(t, err, outbox.ErrPayloadTooLarge)
	require.ErrorContains(t, err, "more than the limit of 10 bytes")

	// The default limit is 1 MiB.
	big := event("1")
	big.Payload = make([]byte, outbox.DefaultMaxPayloadBytes+1)
	_, err = outbox.AppendDB(ctx, db, big)
	require.ErrorIs(t, err, outbox.ErrPayloadTooLarge)

	// A batch with one bad event inserts nothing.
	bad := event("2")
	bad.Type = ""
	_, err = outbox.AppendDB(ctx, db, event("1"), bad)
	require.Error(t, err)
	rows, err := outbox.ReadUnpublished(ctx, db, 0, 10, 0)
	require.NoError(t, err)
	require.Empty(t, rows)
}

func TestRowsInsertedByPlainSQL(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, _ := testenv.DB(t)
	// What another language would write: only the required columns.
	_, err := db.Exec(`INSERT INTO warren_outbox (event_id, producer, event_type, payload) VALUES ('018f-plain', 'billing', 'invoice.paid', '{"n":1}')`)
	require.NoError(t, err)
	// And rows with wrong types.
	_, err = db.Exec(`INSERT INTO warren_outbox (event_id, producer, event_type, payload, headers) VALUES ('bad-headers', 'billing', 'x', 'p', '{"n": 1}')`)
	require.NoError(t, err)
	_, err = db.Exec(`INSERT INTO warren_outbox (event_id, producer, event_type, payload, aggregate_version) VALUES ('bad-version', 'billing', 'x', 'p', 'seven')`)
	require.NoError(t, err)
	_, err = db.Exec(`INSERT INTO warren_outbox (event_id, producer, event_type, payload, headers) VALUES ('not-json', 'Bad Name', 'x', 'p', 'nope')`)
	require.NoError(t, err)

	rows, err := outbox.ReadUnpublished(ctx, db, 0, 10, 0)
	require.NoError(t, err)
	require.Len(t, rows, 4)
	require.NoError(t, rows[0].Err)
	require.Equal(t, "application/json", rows[0].ContentType)
	require.Empty(t, rows[0].Headers, "the default headers {} are none")
	require.Equal(t, `{"n":1}`, string(rows[0].Payload))
	require.False(t, rows[0].CreatedAt.IsZero())

	require.ErrorContains(t, rows[1].Err, `value of "n" is a number, not a string`)
	require.ErrorContains(t, rows[2].Err, `aggregate_version: "seven" is not an integer`)
	require.ErrorContains(t, rows[3].Err, "not a JSON object")
	require.ErrorContains(t, rows[3].Err, "not an application name")
}

func TestMarkPruneStatusList(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, _ := testenv.DB(t)
	var evs []outbox.Event
	for i := 0; i < 30; i++ {
		e := event("a")
		if i%3 == 0 {
			e.Producer = "billing"
		}
		evs = append(evs, e)
	}
	_, err := outbox.AppendDB(ctx, db, evs...)
	require.NoError(t, err)
	rows, err := outbox.ReadUnpublished(ctx, db, 0, 100, 0)
	require.NoError(t, err)
	require.Len(t, rows, 30)

	var seqs []int64
	for _, r := range rows[:20] {
		seqs = append(seqs, r.Seq)
	}
	old := time.Now().Add(-48 * time.Hour)
	require.NoError(t, outbox.MarkPublished(ctx, db, seqs[:10], old))
	require.NoError(t, outbox.MarkPublished(ctx, db, seqs[10:], time.Now()))

	rest, err := outbox.ReadUnpublished(ctx, db, 0, 100, 0)
	require.NoError(t, err)
	require.Len(t, rest, 10)
	after, err := outbox.ReadUnpublished(ctx, db, rows[25].Seq, 100, 0)
	require.NoError(t, err)
	require.Len(t, after, 4)

	st, err := outbox.Status(ctx, db)
	require.NoError(t, err)
	require.Len(t, st, 2)
	var backlog, published int64
	for _, s := range st {
		backlog += s.Backlog
		published += s.Published
		require.False(t, s.OldestUnpublished.IsZero())
	}
	require.Equal(t, int64(10), backlog)
	require.Equal(t, int64(20), published)

	n, err := outbox.Prune(ctx, db, time.Now().Add(-24*time.Hour), 3, true)
	require.NoError(t, err)
	require.Equal(t, int64(10), n, "dry run counts")
	n, err = outbox.Prune(ctx, db, time.Now().Add(-24*time.Hour), 3, false)
	require.NoError(t, err)
	require.Equal(t, int64(10), n)
	n, err = outbox.Prune(ctx, db, time.Now().Add(-24*time.Hour), 3, false)
	require.NoError(t, err)
	require.Zero(t, n)

	list, err := outbox.List(ctx, db, outbox.ListFilter{Producer: "billing", Limit: 100})
	require.NoError(t, err)
	for _, r := range list {
		require.Equal(t, "billing", r.Producer)
	}
	page, err := outbox.List(ctx, db, outbox.ListFilter{Limit: 5})
	require.NoError(t, err)
	require.Len(t, page, 5)
	next, err := outbox.List(ctx, db, outbox.ListFilter{Limit: 5, BeforeSeq: page[4].Seq})
	require.NoError(t, err)
	require.Less(t, next[0].Seq, page[4].Seq)
	un, err := outbox.List(ctx, db, outbox.ListFilter{Unpublished: true, Limit: 100})
	require.NoError(t, err)
	require.Len(t, un, 10)
}

func TestWatcherWakesOnCommitFromAnotherConnection(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, path := testenv.DB(t)
	w, err := outbox.Watch(path, time.Hour, nil)
	require.NoError(t, err)
	defer w.Close()
	// Drain the notifications of opening and migrating.
	time.Sleep(50 * time.Millisecond)
	select {
	case <-w.C:
	default:
	}

	other, err := openOther(path)
	require.NoError(t, err)
	defer other.Close()
	start := time.Now()
	_, err = outbox.AppendDB(ctx, other, event("1"))
	require.NoError(t, err)
	select {
	case <-w.C:
		t.Logf("woke %s after the commit returned", time.Since(start))
	case <-time.After(2 * time.Second):
		t.Fatal("no wake-up within 2s of a commit (fallback is an hour)")
	}
	require.NoError(t, w.Close())
	require.NoError(t, w.Close(), "Close twice")
}

func TestVersionHelperAndErrorText(t *testing.T) {
	t.Parallel()
	e := event("1")
	e.Producer = "Nope!"
	err := e.Validate(0)
	require.Error(t, err)
	require.True(t, strings.HasPrefix(err.Error(), "invalid event: producer:"), err.Error())
}

// MarkPublished marks exactly the rows it is given: runs of consecutive
// seqs as ranges, the rest one by one, the gaps between them untouched, a
// row marked before keeps its published_at.
func TestMarkPublishedMarksExactlyTheGivenRows(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, _ := testenv.DB(t)
	evs := make([]outbox.Event, 40)
	for i := range evs {
		evs[i] = outbox.Event{Producer: "crm", Type: "company.updated", AggregateType: "company", AggregateID: fmt.Sprint(i), Payload: []byte(`{}`)}
	}
	_, err := outbox.AppendDB(ctx, db, evs...)
	require.NoError(t, err)
	rows, err := outbox.ReadUnpublished(ctx, db, 0, 100, 0)
	require.NoError(t, err)
	require.Len(t, rows, 40)
	seq := func(i int) int64 { return rows[i].Seq }

	early := time.Now().Add(-time.Hour).Truncate(time.Millisecond)
	require.NoError(t, outbox.MarkPublished(ctx, db, []int64{seq(3)}, early))

	// Out of order, with a duplicate: runs 0-5 and 10-19 and 30-33, singles
	// 7, 8 and 25 and 39; 3 was marked before.
	var give []int64
	for _, i := range []int{19, 0, 1, 2, 3, 4, 5, 7, 8, 25, 10, 11, 12, 13, 14, 15, 16, 17, 18, 12, 30, 31, 32, 33, 39} {
		give = append(give, seq(i))
	}
	require.NoError(t, outbox.MarkPublished(ctx, db, give, time.Now()))

	want := map[int64]bool{}
	for _, s := range give {
		want[s] = true
	}
	rest, err := outbox.ReadUnpublished(ctx, db, 0, 100, 0)
	require.NoError(t, err)
	for _, r := range rest {
		require.False(t, want[r.Seq], "seq %d was given but is unpublished", r.Seq)
	}
	require.Len(t, rest, 40-len(want))
	got, ok, err := outbox.Get(ctx, db, seq(3), 0)
	require.NoError(t, err)
	require.True(t, ok)
	require.NotNil(t, got.PublishedAt)
	require.True(t, got.PublishedAt.Equal(early), "marked earlier: %v", got.PublishedAt)
}
