package consumer

import (
	"os"
	"runtime"
)

// TuneProcess gives the Go runtime one P (GOMAXPROCS) more than its
// default, unless the GOMAXPROCS environment variable is set, and returns
// the value in effect. Call it once at the start of a process that runs a
// consumer; `warren consume` does.
//
// The committer runs SQLite (cgo) for most of its time, and a goroutine in
// a cgo call keeps its P, also while SQLite waits for an fsync. With as
// many Ps as CPUs, the goroutines the committer just released (the handlers
// of a committed batch, the next deliveries) wait for a P meanwhile. With
// one more, they run on the CPU the fsync leaves idle: on 2 CPUs the
// consumer of `go tool task bench` turned 10 to 15% more deliveries per
// second into inbox rows.
func TuneProcess() int {
	if os.Getenv("GOMAXPROCS") != "" {
		return runtime.GOMAXPROCS(0)
	}
	n := runtime.GOMAXPROCS(0) + 1
	runtime.GOMAXPROCS(n)
	return n
}
