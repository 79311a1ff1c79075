package inbox_test

import (
	"context"
	dbsql "database/sql"
	"errors"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/inbox"
)

var base = time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)

type seeded struct {
	consumer, id, eventType string
	status                  inbox.Status
	at                      time.Time
}

// seed writes n rows over three consumers, with runs of rows sharing one
// millisecond so the keyset must break ties.
func seed(t *testing.T, db *dbsql.DB, n int) []seeded {
	t.Helper()
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	var out []seeded
	for i := range n {
		s := seeded{
			consumer:  []string{"billing", "audit", "mail"}[i%3],
			id:        fmt.Sprintf("id-%05d", (i*7919)%n),
			eventType: []string{"company.updated", "company.created"}[i%2],
			at:        base.Add(time.Duration(i/5) * time.Millisecond),
		}
		d := delivery(s.consumer, s.id)
		d.EventType, d.RoutingKey, d.ReceivedAt = s.eventType, s.eventType, s.at
		d.AggregateID = fmt.Sprint(i % 10)
		switch i % 10 {
		case 3:
			s.status = inbox.StatusRetrying
			require.NoError(t, inbox.RecordFailure(ctx, tx, d, 1, errors.New("boom"), s.status))
		case 7:
			s.status = inbox.StatusPoisoned
			require.NoError(t, inbox.RecordPoisoned(ctx, tx, d, 5, "max-attempts", true))
		default:
			s.status = inbox.StatusProcessed
			_, err := inbox.MarkProcessed(ctx, tx, d, 1)
			require.NoError(t, err)
		}
		out = append(out, s)
	}
	require.NoError(t, tx.Commit())
	return out
}

func key(consumer, id string) string { return consumer + "/" + id }

func listAll(t *testing.T, db *dbsql.DB, f inbox.Filter) []inbox.Entry {
	t.Helper()
	var all []inbox.Entry
	for pages := 0; ; pages++ {
		require.Less(t, pages, 10000, "pagination does not end")
		p, err := inbox.List(context.Background(), db, f)
		require.NoError(t, err)
		all = append(all, p.Entries...)
		if p.Next == "" {
			return all
		}
		f.Cursor = p.Next
	}
}

func TestListPaginationCoversEveryRowOnce(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rows := seed(t, b.db, 1003)

	for _, oldest := range []bool{false, true} {
		for _, limit := range []int{1, 7, 100, 5000} {
			t.Run(fmt.Sprintf("oldest=%v/limit=%d", oldest, limit), func(t *testing.T) {
				got := listAll(t, b.db, inbox.Filter{Limit: limit, Oldest: oldest})
				require.Len(t, got, len(rows))
				seen := map[string]bool{}
				for i, e := range got {
					k := key(e.Consumer, e.MessageID)
					require.False(t, seen[k], "row %s twice", k)
					seen[k] = true
					if i > 0 {
						prev := got[i-1]
						less := prev.ReceivedAt.Before(e.ReceivedAt) ||
							prev.ReceivedAt.Equal(e.ReceivedAt) && key(prev.Consumer, prev.MessageID) < k
						require.Equal(t, oldest, less, "order at %d", i)
					}
					require.Nil(t, e.Body, "no body unless asked")
				}
			})
		}
	}

	t.Run("FilteredByConsumerAndStatus", func(t *testing.T) {
		want := map[string]bool{}
		for _, r := range rows {
			if r.consumer == "audit" && r.status == inbox.StatusPoisoned {
				want[key(r.consumer, r.id)] = true
			}
		}
		got := listAll(t, b.db, inbox.Filter{Consumer: "audit", Status: inbox.StatusPoisoned, Limit: 3, WithBody: true})
		require.Len(t, got, len(want))
		for _, e := range got {
			require.True(t, want[key(e.Consumer, e.MessageID)])
			require.NotNil(t, e.Body)
		}
	})

	t.Run("TimeRange", func(t *testing.T) {
		since, until := base.Add(50*time.Millisecond), base.Add(100*time.Millisecond)
		var want []string
		for _, r := range rows {
			if !r.at.Before(since) && r.at.Before(until) && r.eventType == "company.created" {
				want = append(want, key(r.consumer, r.id))
			}
		}
		got := listAll(t, b.db, inbox.Filter{Since: since, Until: until, EventType: "company.created", Limit: 9, Oldest: true})
		var keys []string
		for _, e := range got {
			keys = append(keys, key(e.Consumer, e.MessageID))
		}
		sort.Strings(want)
		sort.Strings(keys)
		require.Equal(t, want, keys)
	})

	t.Run("RowsAddedWhilePagingDoNotShiftPages", func(t *testing.T) {
		ctx := context.Background()
		f := inbox.Filter{Consumer: "billing", Limit: 50, Oldest: true}
		p, err := inbox.List(ctx, b.db, f)
		require.NoError(t, err)
		before := map[string]bool{}
		for _, e := range p.Entries {
			before[e.MessageID] = true
		}
		// An older row arrives between pages: it must not push a row of
		// the first page onto the second.
		d := delivery("billing", "late-arrival")
		d.ReceivedAt = base.Add(-time.Hour)
		_, err = inbox.MarkProcessed(ctx, b.db, d, 1)
		require.NoError(t, err)
		f.Cursor = p.Next
		rest := listAll(t, b.db, f)
		for _, e := range rest {
			require.False(t, before[e.MessageID], "row %s on two pages", e.MessageID)
		}
	})
}

func TestListHostileFilters(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	seed(t, b.db, 30)
	hostile := []string{
		`x' OR '1'='1`,
		`%`,
		`_`,
		`company.%`,
		`'; DROP TABLE warren_inbox; --`,
		`" OR ""="`,
		`\`,
		`company.updated' --`,
		"nul\x00byte",
	}
	for i, h := range hostile {
		d := delivery("billing", fmt.Sprintf("hostile-%d", i))
		d.EventType, d.AggregateType, d.AggregateID = h, h, h
		_, err := inbox.MarkProcessed(ctx, b.db, d, 1)
		require.NoError(t, err)
	}
	for i, h := range hostile {
		for _, f := range []inbox.Filter{
			{EventType: h},
			{AggregateType: h},
			{AggregateID: h},
			{Consumer: "billing", EventType: h, AggregateType: h, AggregateID: h},
		} {
			got := listAll(t, b.db, f)
			require.Len(t, got, 1, "filter %+v", f)
			require.Equal(t, fmt.Sprintf("hostile-%d", i), got[0].MessageID)
			require.Equal(t, h, got[0].EventType)
		}
		// As a consumer name or a message id it matches nothing.
		got := listAll(t, b.db, inbox.Filter{Consumer: h})
		require.Empty(t, got)
		_, err := inbox.Show(ctx, b.db, h, h)
		require.ErrorIs(t, err, inbox.ErrNotFound)
		st, err := inbox.Stats(ctx, b.db, h)
		require.NoError(t, err)
		require.Zero(t, st.Total)
	}
	// Nothing was dropped or rewritten.
	st, err := inbox.Stats(ctx, b.db, "")
	require.NoError(t, err)
	require.EqualValues(t, 30+len(hostile), st.Total)

	for _, c := range []string{"garbage", "e30", `eyJ0IjoiJyBPUiAxPTEgLS0ifQ`} {
		_, err = inbox.List(ctx, b.db, inbox.Filter{Cursor: c})
		require.ErrorIs(t, err, inbox.ErrBadCursor, c)
	}
	_, err = inbox.List(ctx, b.db, inbox.Filter{Status: "processed' OR '1'='1"})
	require.Error(t, err)
	_, err = inbox.List(ctx, b.db, inbox.Filter{Limit: -1})
	require.Error(t, err)
}

func TestStats(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	rows := seed(t, b.db, 100)
	require.NoError(t, inbox.RecordDuplicate(ctx, b.db, rows[0].consumer, rows[0].id))
	require.NoError(t, inbox.RecordDuplicate(ctx, b.db, rows[0].consumer, rows[0].id))
	require.NoError(t, inbox.RecordDuplicate(ctx, b.db, "billing", "no-such-row"))

	want := inbox.Summary{Consumer: "billing", ByStatus: map[inbox.Status]int64{}, ByEventType: map[string]int64{}}
	for _, r := range rows {
		if r.consumer != "billing" {
			continue
		}
		want.Total++
		want.ByStatus[r.status]++
		want.ByEventType[r.eventType]++
		if want.Oldest.IsZero() || r.at.Before(want.Oldest) {
			want.Oldest = r.at
		}
		if r.at.After(want.Newest) {
			want.Newest = r.at
		}
	}
	want.Duplicates = 2
	got, err := inbox.Stats(ctx, b.db, "billing")
	require.NoError(t, err)
	require.Equal(t, want, got)

	all, err := inbox.Stats(ctx, b.db, "")
	require.NoError(t, err)
	require.EqualValues(t, 100, all.Total)
	require.EqualValues(t, 2, all.Duplicates)

	empty, err := inbox.Stats(ctx, b.db, "nobody")
	require.NoError(t, err)
	require.Zero(t, empty.Total)
	require.True(t, empty.Oldest.IsZero())
	require.Len(t, empty.ByStatus, 3)
}

func TestPrune(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	rows := seed(t, b.db, 250)
	// All seeded rows were processed "now"; age half of the processed ones.
	_, err := b.db.ExecContext(ctx, `UPDATE warren_inbox SET first_received_at = '2020-01-01T00:00:00.000Z', processed_at = '2020-01-01T00:00:00.000Z'
		WHERE status = 'processed' AND consumer != 'mail'`)
	require.NoError(t, err)
	var old, kept int64
	for _, r := range rows {
		if r.status == inbox.StatusProcessed && r.consumer != "mail" {
			old++
		} else {
			kept++
		}
	}
	n, err := inbox.Prune(ctx, b.db, "", time.Now().Add(-time.Hour), 7, true)
	require.NoError(t, err)
	require.Equal(t, old, n, "dry run counts")
	st, err := inbox.Stats(ctx, b.db, "")
	require.NoError(t, err)
	require.EqualValues(t, len(rows), st.Total, "dry run deletes nothing")

	var billing int64
	for _, r := range rows {
		if r.status == inbox.StatusProcessed && r.consumer == "billing" {
			billing++
		}
	}
	n, err = inbox.Prune(ctx, b.db, "billing", time.Now().Add(-time.Hour), 7, true)
	require.NoError(t, err)
	require.Equal(t, billing, n, "one consumer's rows")
	n, err = inbox.Prune(ctx, b.db, "billing", time.Now().Add(-time.Hour), 7, false)
	require.NoError(t, err)
	require.Equal(t, billing, n)

	n, err = inbox.Prune(ctx, b.db, "", time.Now().Add(-time.Hour), 7, false)
	require.NoError(t, err)
	require.Equal(t, old-billing, n)
	st, err = inbox.Stats(ctx, b.db, "")
	require.NoError(t, err)
	require.Equal(t, kept, st.Total)
	require.NotZero(t, st.ByStatus[inbox.StatusPoisoned])
	require.NotZero(t, st.ByStatus[inbox.StatusRetrying])

	n, err = inbox.Prune(ctx, b.db, "", time.Now().Add(-time.Hour), 0, false)
	require.NoError(t, err)
	require.Zero(t, n)
}

func TestConsumersAndOverview(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	names, err := inbox.Consumers(ctx, b.db)
	require.NoError(t, err)
	require.Empty(t, names)

	rows := seed(t, b.db, 100)
	names, err = inbox.Consumers(ctx, b.db)
	require.NoError(t, err)
	require.Equal(t, []string{"audit", "billing", "mail"}, names)

	var retrying, poisoned int64
	var lastFailed seeded
	for _, r := range rows {
		if r.consumer != "billing" {
			continue
		}
		switch r.status {
		case inbox.StatusRetrying:
			retrying++
		case inbox.StatusPoisoned:
			poisoned++
		default:
			continue
		}
		if !r.at.Before(lastFailed.at) {
			lastFailed = r
		}
	}
	st, err := inbox.Overview(ctx, b.db, "billing")
	require.NoError(t, err)
	require.Equal(t, retrying, st.Retrying)
	require.Equal(t, poisoned, st.Poisoned)
	require.Equal(t, lastFailed.at, st.LastErrorAt)
	require.NotEmpty(t, st.LastError)
	require.False(t, st.LastReceived.IsZero())

	st, err = inbox.Overview(ctx, b.db, "nobody")
	require.NoError(t, err)
	require.Zero(t, st.Retrying+st.Poisoned)
	require.Empty(t, st.LastError)
	require.True(t, st.LastReceived.IsZero())
}
