package consumer

import (
	"context"
	dbsql "database/sql"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/inbox"
	wsql "github.com/warrenmq/warren/sql"
)

// The committer acks a delivery as soon as the transaction holding it
// committed, before its handler goroutine returns to the Router: the ones
// that succeeded or were processed before, not the ones that failed.
func TestCommitterSettlesCommittedDeliveriesEarly(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, err := wsql.Open(ctx, filepath.Join(t.TempDir(), "inbox.db"), wsql.Options{})
	require.NoError(t, err)
	defer db.Close()
	_, err = wsql.Migrate(ctx, db)
	require.NoError(t, err)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	// "dup" was processed before.
	done, err := inbox.MarkProcessed(ctx, db, &inbox.Delivery{Consumer: "c", MessageID: "dup"}, 1)
	require.NoError(t, err)
	require.True(t, done)

	r := &recorder{}
	a := newAcker(r, log)
	ids := []string{"ok", "bad", "dup"}
	slots := make(chan struct{}, len(ids))
	handouts := make([]*handout, len(ids))
	c := newCommitter(ctx, db, HandlerFunc(func(_ context.Context, _ *dbsql.Tx, d *Delivery) error {
		if d.MessageID == "bad" {
			return errors.New("bad fails")
		}
		return nil
	}), time.Second, len(ids), log)
	go c.loop()
	defer c.close()

	results := make([]jobResult, len(ids))
	for i, id := range ids {
		tag := uint64(i + 1)
		a.add(tag)
		slots <- struct{}{}
		handouts[i] = &handout{tag: tag, a: a, slots: slots}
		msg := message.NewMessage(id, []byte(`{}`))
		msg.SetContext(context.WithValue(ctx, handoutKey{}, handouts[i]))
		d := &Delivery{Delivery: inbox.Delivery{Consumer: "c", MessageID: id}, msg: msg}
		row, err := inbox.EncodeProcessed(&d.Delivery, 1)
		require.NoError(t, err)
		results[i] = c.submit(&job{kind: jobHandle, d: d, failStatus: inbox.StatusRetrying, row: row})
	}
	require.Equal(t, outcomeOK, results[0].outcome)
	require.Equal(t, outcomeFailed, results[1].outcome)
	require.Equal(t, outcomeDuplicate, results[2].outcome)

	require.True(t, handouts[0].done.Load(), "ok: settled by the committer")
	require.False(t, handouts[1].done.Load(), "bad: left to the handler's own outcome")
	require.True(t, handouts[2].done.Load(), "dup: settled by the committer")
	require.Len(t, slots, 1, "only the failed delivery still holds its slot")
	a.flush(true)
	require.Equal(t, []string{"ack 1 multiple=true", "ack 3 multiple=false"}, r.frames)

	// The Router's ack later changes nothing: settled once.
	handouts[0].settle(true)
	require.Len(t, slots, 1)
}
