// Package e2e runs warren as real processes against the real broker and
// real SQLite files: kill -9 at random moments, standby takeover, cut
// connections, graceful stop and the command line's errors.
package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// warrenBin is the warren binary built once for the package's tests.
var warrenBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "warren-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	warrenBin = filepath.Join(dir, "warren")
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	build := exec.Command("go", "build", "-o", warrenBin, "./cmd/warren")
	build.Dir = root
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build warren:", err)
		os.Exit(2)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}
