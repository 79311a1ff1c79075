package chaos

import (
	"testing"
	"time"
)

// TestChaosShort is the chaos run in small, for the ordinary test run
// (under a minute): every kind of fault once or a few times.
func TestChaosShort(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos run: not with -short")
	}
	runChaos(t, scenario{
		Events:     5000,
		Aggregates: 50,
		MaxBatch:   10,
		Kills:      6,
		KillGap:    [2]time.Duration{500 * time.Millisecond, 2 * time.Second},
		CutEvery:   2 * time.Second,
		CutFor:     [2]time.Duration{100 * time.Millisecond, 500 * time.Millisecond},
		Stall:      4 * time.Second,
		Heartbeat:  time.Second,
		NodeDown:   time.Second,
		AlarmFor:   2 * time.Second,
		Drain:      40 * time.Second,

		ConsumerConcurrency: 1,
	})
}
