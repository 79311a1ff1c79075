package relay_test

import (
	"runtime"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/relay"
)

func TestTuneProcess(t *testing.T) {
	before := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(before) })

	// The environment wins.
	t.Setenv("GOMAXPROCS", strconv.Itoa(before))
	require.Equal(t, before, relay.TuneProcess())
	require.Equal(t, before, runtime.GOMAXPROCS(0))

	t.Setenv("GOMAXPROCS", "")
	require.Equal(t, 1, relay.TuneProcess())
	require.Equal(t, 1, runtime.GOMAXPROCS(0))
}
