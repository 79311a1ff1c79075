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
