package chaos

import (
	"bufio"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// service is one long-running process of the chaos run (the relay or the
// consumer) under a supervisor that restarts it whenever it ends, like
// systemd's Restart=always: at once after a kill by the test, after a
// short pause when it exited by itself.
type service struct {
	name    string
	t       *testing.T
	argv    []string
	env     []string
	logPath string
	// once: the process runs once (the application); it is not restarted.
	once bool
	// onStart is called with the start time of every run after the first.
	onStart func(time.Time)

	mu       sync.Mutex
	cmd      *exec.Cmd
	exited   chan struct{} // closed when the current run ended
	killing  bool          // the current run is being killed by the test
	stopping bool          // the test ends the service: do not restart
	runs     int
	kills    int
	exits    []string // runs that ended by themselves: exit status and log tail
	hwmKB    int64    // highest VmHWM seen over all runs
	done     chan struct{}
}

func startService(t *testing.T, name, logPath string, env []string, argv ...string) *service {
	t.Helper()
	s := &service{name: name, t: t, argv: argv, env: env, logPath: logPath, done: make(chan struct{})}
	if err := s.spawn(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go s.supervise()
	t.Cleanup(func() { s.stop(5 * time.Second) })
	return s
}

func (s *service) spawn() error {
	f, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(s.argv[0], s.argv[1:]...)
	cmd.Env = append(os.Environ(), s.env...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); _ = f.Close(); close(exited) }()
	s.mu.Lock()
	s.cmd, s.exited, s.killing = cmd, exited, false
	s.runs++
	s.mu.Unlock()
	return nil
}

func (s *service) supervise() {
	defer close(s.done)
	for {
		s.mu.Lock()
		exited := s.exited
		s.mu.Unlock()
		<-exited
		s.mu.Lock()
		cmd, killing, stopping := s.cmd, s.killing, s.stopping
		if !killing && (!stopping || s.once) {
			s.exits = append(s.exits, cmd.ProcessState.String()+"\n"+tail(s.logPath, 15))
		}
		s.mu.Unlock()
		if stopping || s.once {
			return
		}
		if !killing {
			time.Sleep(200 * time.Millisecond)
		}
		if err := s.spawn(); err != nil {
			s.t.Errorf("restart %s: %v", s.name, err)
			return
		}
		if s.onStart != nil {
			s.onStart(time.Now())
		}
	}
}

// sample records the current run's VmHWM.
func (s *service) sample() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sampleLocked()
}

func (s *service) sampleLocked() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	select {
	case <-s.exited:
		return
	default:
	}
	if kb := vmHWM(s.cmd.Process.Pid); kb > s.hwmKB {
		s.hwmKB = kb
	}
}

// kill sends SIGKILL to the current run, after sampling its memory; the
// supervisor restarts it. It returns when the process is gone.
func (s *service) kill() {
	s.mu.Lock()
	s.sampleLocked()
	s.killing = true
	s.kills++
	exited := s.exited
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	s.mu.Unlock()
	<-exited
}

// stop ends the service with SIGTERM (SIGKILL after grace) and returns
// whether it exited within grace.
func (s *service) stop(grace time.Duration) bool {
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		<-s.done
		return true
	}
	s.sampleLocked()
	s.stopping = true
	cmd, exited := s.cmd, s.exited
	s.mu.Unlock()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	clean := true
	select {
	case <-exited:
	case <-time.After(grace):
		clean = false
		_ = cmd.Process.Signal(syscall.SIGKILL)
	}
	<-s.done
	return clean && cmd.ProcessState.ExitCode() == 0
}

func (s *service) unexpectedExits() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.exits...)
}

// vmHWM returns the peak resident set size of a process in KiB, or 0.
func vmHWM(pid int) int64 {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb
		}
	}
	return 0
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// waitLog waits until the file holds substr.
func waitLog(t *testing.T, path, substr string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if b, _ := os.ReadFile(path); strings.Contains(string(b), substr) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s does not say %q after %s:\n%s", path, substr, d, tail(path, 30))
}

// startOnce runs a process once, under the same bookkeeping as a service:
// its exit, whatever it is, is in unexpectedExits.
func startOnce(t *testing.T, name, logPath string, argv ...string) *service {
	t.Helper()
	s := &service{name: name, t: t, argv: argv, logPath: logPath, once: true, done: make(chan struct{})}
	if err := s.spawn(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go s.supervise()
	t.Cleanup(func() { s.stop(5 * time.Second) })
	return s
}
