package relay

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestBatchErrorIsOneLine(t *testing.T) {
	require.NoError(t, batchError([]error{nil, nil}))
	lost := errors.New("connection to the broker lost: EOF")
	require.Equal(t, lost, batchError([]error{lost}))
	err := batchError([]error{nil, lost, errors.New("other"), nil})
	require.ErrorIs(t, err, lost)
	require.Equal(t, "2 of 4 rows not published, they will be retried; the first: connection to the broker lost: EOF", err.Error())
}

// Marks of a steady stream follow each other closely; after a large mark
// (a backlog draining) the marker waits longer while rows keep coming, and
// stops waiting once they stop.
func TestMarkerGathersLongerWhileABacklogDrains(t *testing.T) {
	m := newMarker(context.Background(), nil, slog.New(slog.DiscardHandler), nil)
	took := func(n int) time.Duration {
		start := time.Now()
		m.gather(n)
		return time.Since(start)
	}
	require.Less(t, took(10), backlogMarkInterval, "a small mark: the short interval")
	require.Less(t, took(backlogMark), backlogMarkInterval, "nothing more came: no long wait")

	stop := make(chan struct{})
	go func() { // confirms keep coming
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
				m.add(1)
			}
		}
	}()
	require.GreaterOrEqual(t, took(backlogMark), backlogMarkInterval, "rows keep coming: it gathers the long interval")
	close(stop)
}
