//go:build stress

package chaos

import (
	"testing"
	"time"
)

// TestChaos is the full chaos run: 100,000 events over 500 aggregates,
// at least 30 SIGKILLs of the relay and the consumer, connection cuts every
// few seconds, a 30 s stall, a node restart and a 10 s memory alarm.
func TestChaos(t *testing.T) {
	runChaos(t, scenario{
		Events:     100_000,
		Aggregates: 500,
		MaxBatch:   20,
		Kills:      36,
		KillGap:    [2]time.Duration{time.Second, 5 * time.Second},
		CutEvery:   5 * time.Second,
		CutFor:     [2]time.Duration{200 * time.Millisecond, 2 * time.Second},
		Stall:      30 * time.Second,
		Heartbeat:  2 * time.Second,
		NodeDown:   3 * time.Second,
		AlarmFor:   10 * time.Second,
		Drain:      8 * time.Minute,

		ConsumerConcurrency: 1,
	})
}
