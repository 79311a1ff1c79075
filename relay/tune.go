package relay

import (
	"os"
	"runtime"
)

// TuneProcess gives the Go runtime one P (GOMAXPROCS=1), unless the
// GOMAXPROCS environment variable is set, and returns the value in
// effect. Call it once at the start of a process that does nothing but
// relay; `warren relay` does. An application that embeds the relay keeps
// its own setting.
//
// The relay is a pipeline of single goroutines (the outbox reader, the
// Router's handlers queueing publishes, the connection's one writer, the
// confirm dispatcher, the marker) that hand each event on to the next.
// With a P per CPU every hand-off may wake another thread, which then
// spins, steals and sleeps again; on a machine whose CPUs the broker and
// the application need too, those wake-ups cost more than the parallelism
// gives. SQLite's calls leave the P to the other goroutines while they run
// (the runtime hands it off), so one P is not one goroutine at a time. On
// 2 CPUs, `go tool task bench` measured with one P: the relay's CPU per
// event fell by about a sixth in a backlog drain (0.55–0.58 of a core
// against 0.62–0.70 at a higher rate), and at 1,000 events/s its CPU fell
// from 0.38 to 0.30 of a core and the p99 from commit to the consumer's
// inbox from 53–62 ms to 19–23 ms.
func TuneProcess() int {
	if os.Getenv("GOMAXPROCS") != "" {
		return runtime.GOMAXPROCS(0)
	}
	runtime.GOMAXPROCS(1)
	return 1
}
