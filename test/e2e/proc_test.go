package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// proc is a warren process started by a test.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startWarren runs `warren args...` with env added to the environment.
func startWarren(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(warrenBin, args...)
	cmd.Env = append(os.Environ(), env...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start warren %v: %v", args, err)
	}
	p := &proc{cmd: cmd, out: out, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *proc) kill() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

func (p *proc) signal(s os.Signal) { _ = p.cmd.Process.Signal(s) }

// wait waits for the process to exit and returns its exit code (-1 on
// timeout).
func (p *proc) wait(d time.Duration) int {
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(d):
		return -1
	}
}

// waitOutput waits until the process printed substr.
func (p *proc) waitOutput(t *testing.T, substr string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if strings.Contains(p.out.String(), substr) {
			return
		}
		select {
		case <-p.done:
			t.Fatalf("warren exited before printing %q:\n%s", substr, p.out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("warren did not print %q within %s:\n%s", substr, d, p.out.String())
}

// runWarren runs `warren args...` to completion and returns its output and
// exit code.
func runWarren(t *testing.T, env []string, stdin string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(warrenBin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		}
		t.Fatalf("run warren %v: %v", args, err)
	}
	return string(out), 0
}
