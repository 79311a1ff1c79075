package chaos

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// The binaries the chaos run starts, built once in TestMain.
var (
	warrenBin   string // warren, for `warren relay`
	appBin      string // internal/chaosapp: the application appending events
	consumerBin string // internal/chaosconsumer: a consumer with a side-effect table
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "warren-chaos-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	warrenBin = filepath.Join(dir, "warren")
	appBin = filepath.Join(dir, "chaosapp")
	consumerBin = filepath.Join(dir, "chaosconsumer")
	for bin, pkg := range map[string]string{
		warrenBin:   "./cmd/warren",
		appBin:      "./test/chaos/internal/chaosapp",
		consumerBin: "./test/chaos/internal/chaosconsumer",
	} {
		build := exec.Command("go", "build", "-o", bin, pkg)
		build.Dir = root
		build.Stdout, build.Stderr = os.Stdout, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build", pkg+":", err)
			os.Exit(2)
		}
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}
