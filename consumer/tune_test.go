package consumer_test

import (
	"runtime"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/consumer"
)

func TestTuneProcess(t *testing.T) {
	before := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(before) })

	// The environment wins.
	t.Setenv("GOMAXPROCS", strconv.Itoa(before))
	require.Equal(t, before, consumer.TuneProcess())
	require.Equal(t, before, runtime.GOMAXPROCS(0))

	t.Setenv("GOMAXPROCS", "")
	require.Equal(t, before+1, consumer.TuneProcess())
	require.Equal(t, before+1, runtime.GOMAXPROCS(0))
}
