package relay

import (
	"errors"
	"testing"

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

// Marks of a steady stream follow each other closely; marks of a backlog
// being drained gather four times as long, and cost less per row.
func TestMarkWaitGrowsWithABacklog(t *testing.T) {
	require.Equal(t, markInterval, markWait(1))
	require.Equal(t, markInterval, markWait(backlogMark-1))
	require.Equal(t, backlogMarkInterval, markWait(backlogMark))
	require.Equal(t, backlogMarkInterval, markWait(2000))
	require.Greater(t, backlogMarkInterval, markInterval)
}
