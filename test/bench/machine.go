package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// machine describes where the figures were measured.
type machine struct {
	CPUs       int
	CPUModel   string
	MemoryMiB  int
	Kernel     string
	RabbitMQ   string
	Erlang     string
	PostgreSQL string
	Go         string
	LoadAvg    string // at the start
	Command    string
}

func describeMachine(conn *amqp.Connection) machine {
	m := machine{
		CPUs:     runtime.NumCPU(),
		CPUModel: "unknown",
		Go:       runtime.Version(),
		Command:  strings.Join(os.Args, " "),
		RabbitMQ: "unknown",
	}
	if v, ok := conn.Properties["version"].(string); ok {
		m.RabbitMQ = v
	}
	if v, ok := conn.Properties["platform"].(string); ok {
		m.Erlang = v
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		_ = f.Close()
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "MemTotal:") {
				f := strings.Fields(line)
				if len(f) >= 2 {
					kb, _ := strconv.Atoi(f[1])
					m.MemoryMiB = kb / 1024
				}
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = "Linux " + strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		f := strings.Fields(string(b))
		if len(f) >= 3 {
			m.LoadAvg = strings.Join(f[:3], " ")
		}
	}
	return m
}

// clockTick is USER_HZ, 100 on every Linux the bench runs on.
const clockTick = 100

// cpuTime returns the CPU time (user + system) pid used so far; zero when
// unknown.
func cpuTime(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name may hold spaces; fields after the last ')' are
	// fixed: utime and stime are fields 14 and 15 of the whole line.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+st) * time.Second / clockTick
}

// statusKiB returns a "VmXxx:" field of /proc/pid/status in KiB.
func statusKiB(pid int, field string) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, field+":") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				n, _ := strconv.Atoi(f[1])
				return n
			}
		}
	}
	return 0
}

// brokerPID finds the local process listening on the broker URL's port, so
// that the bench can say how much CPU the broker used in each phase. It
// returns 0 when the broker is remote or cannot be found.
func brokerPID(rawURL string) int {
	u, err := url.Parse(rawURL)
	if err != nil {
		return 0
	}
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = "5672"
		if u.Scheme == "amqps" {
			port = "5671"
		}
	}
	if ips, err := net.LookupIP(host); err != nil || len(ips) == 0 || !ips[0].IsLoopback() {
		return 0
	}
	p, _ := strconv.Atoi(port)
	inodes := map[string]bool{}
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(table)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 || f[3] != "0A" { // 0A: LISTEN
				continue
			}
			_, hexPort, _ := strings.Cut(f[1], ":")
			if n, err := strconv.ParseInt(hexPort, 16, 32); err == nil && int(n) == p {
				inodes["socket:["+f[9]+"]"] = true
			}
		}
	}
	if len(inodes) == 0 {
		return 0
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/fd")
	for _, fdDir := range procs {
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
			if err == nil && inodes[target] {
				pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(fdDir)))
				return pid
			}
		}
	}
	return 0
}

// cpuMeter measures the CPU the relay, the broker and the bench process use
// during a phase.
type cpuMeter struct {
	pids  [3]int
	start [3]time.Duration
	wall  time.Time
}

// cpuUse is the CPU each process used during a phase, as a share of one
// core.
type cpuUse struct {
	Relay, Broker, Bench float64
	Wall                 time.Duration
}

func (b *bench) meter(relayPID int) *cpuMeter {
	m := &cpuMeter{pids: [3]int{relayPID, b.brokerPID, os.Getpid()}, wall: time.Now()}
	for i, pid := range m.pids {
		m.start[i] = cpuTime(pid)
	}
	return m
}

func (m *cpuMeter) stop() cpuUse {
	wall := time.Since(m.wall)
	var share [3]float64
	for i, pid := range m.pids {
		if pid > 0 && wall > 0 {
			share[i] = float64(cpuTime(pid)-m.start[i]) / float64(wall)
		}
	}
	return cpuUse{Relay: share[0], Broker: share[1], Bench: share[2], Wall: wall}
}

func (c cpuUse) String() string {
	s := fmt.Sprintf("broker %.0f%%, bench %.0f%% of a core", c.Broker*100, c.Bench*100)
	if c.Relay > 0 {
		s = fmt.Sprintf("relay %.0f%%, ", c.Relay*100) + s
	}
	return s
}

// The broker counts as quiet when it used at most settleShare of a core
// over settleWindow; settle waits for that at most settleMax, and once it
// gave up (a broker that others keep busy) at most settleMaxBusy.
const (
	settleWindow  = 300 * time.Millisecond
	settleShare   = 0.10
	settleMax     = 10 * time.Second
	settleMaxBusy = time.Second
)

// settle waits until the broker is quiet before a timed phase starts, so
// that the phase does not pay for the after-work of the one before: a
// deleted quorum queue, a filled queue's log written to its segment files.
// Both sides of a ratio settle alike. It says so when it waited long, and
// measures anyway when the broker stays busy past settleMax.
func (b *bench) settle(ctx context.Context, phase string) {
	if b.brokerPID <= 0 {
		return
	}
	limit := settleMax
	if b.brokerBusy {
		limit = settleMaxBusy
	}
	start := time.Now()
	last := cpuTime(b.brokerPID)
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(settleWindow):
		}
		now := cpuTime(b.brokerPID)
		share := float64(now-last) / float64(settleWindow)
		last = now
		waited := time.Since(start)
		if share <= settleShare {
			if waited > 2*settleWindow {
				b.logf("%s: waited %s for the broker to be quiet", phase, waited.Round(100*time.Millisecond))
			}
			return
		}
		if waited > limit {
			if !b.brokerBusy {
				b.logf("%s: the broker is still busy after %s (%.0f%% of a core); measuring anyway, and waiting at most %s before the next phases", phase, waited.Round(time.Second), 100*share, settleMaxBusy)
			}
			b.brokerBusy = true
			return
		}
	}
}
