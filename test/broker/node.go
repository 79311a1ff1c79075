package broker

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	// DefaultServer is where Debian's rabbitmq-server package puts the
	// script that starts a node as the calling user. The /usr/sbin wrapper
	// switches to the rabbitmq user when run as root, which then cannot
	// write a data folder that root made.
	DefaultServer = "/usr/lib/rabbitmq/bin/rabbitmq-server"

	// ServerEnv names the environment variable that overrides DefaultServer.
	// rabbitmqctl is taken from the same folder.
	ServerEnv = "WARREN_RABBITMQ_SERVER"

	// StartTimeout bounds how long Start and StartNode wait for a node to
	// accept AMQP connections when the context has no deadline of its own.
	StartTimeout = 90 * time.Second

	// stopTimeout is how long Stop waits for a graceful stop before it
	// kills the node.
	stopTimeout = 30 * time.Second

	// ctlTimeout bounds one rabbitmqctl call made by the helpers.
	ctlTimeout = 60 * time.Second

	// host is where private nodes listen: loopback only.
	host = "127.0.0.1"
)

// ErrNotRunning is returned by Lookup when no node recorded in a folder runs.
var ErrNotRunning = errors.New("no private RabbitMQ node is running there")

// Options describe a private node. The zero value is a node with a unique
// name, free ports and a temporary data folder.
type Options struct {
	// Name is the node's short name, without "@localhost". Default:
	// "warren-" and random characters (Start puts the test's name in it).
	Name string

	// Port is the AMQP port on 127.0.0.1. Default: 0, a free port.
	Port int

	// Config is the body of the node's rabbitmq.conf, for example TLS
	// listeners. Keep the plain AMQP listener: the node is known to be up
	// when it answers there. Default: none.
	Config string

	// Dir holds the node's data, logs and Erlang cookie. A folder that held
	// a node before is reused with its data. Default: t.TempDir() in Start,
	// a new temporary folder in StartNode, removed when the node stops.
	Dir string

	// Detach lets the node outlive this process: it runs in a session of
	// its own and is stopped only by Stop. Default: false, the node is
	// killed by the kernel when this process dies (Linux), so a test that
	// panics or times out does not leave a node behind.
	Detach bool
}

// Node is a running private RabbitMQ node.
type Node struct {
	Name     string // node name, e.g. warren-3f9a2c@localhost
	Host     string // 127.0.0.1
	Port     int    // AMQP port
	DistPort int    // Erlang distribution port
	URL      string // amqp://guest:guest@127.0.0.1:PORT/
	Dir      string // data, logs and cookie
	LogFile  string // the node's console output and log
	PID      int    // the node's beam process

	ctl     string   // path to rabbitmqctl
	env     []string // the node's environment; rabbitmqctl needs the same
	ownsDir bool     // Dir was made by StartNode and is removed by Stop

	exited <-chan struct{} // closed when the process exited; nil when not our child

	stopOnce sync.Once
	stopErr  error
}

// Start starts a private node for the test, waits until it accepts AMQP
// connections and stops it when the test ends. It fails the test with the
// tail of the node's log when the node does not start within StartTimeout.
func Start(t testing.TB, opts Options) *Node {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	if opts.Name == "" {
		opts.Name = "warren-" + testName(t.Name()) + "-" + randomHex(3)
	}
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	n, err := StartNode(ctx, opts)
	if err != nil {
		t.Fatalf("broker: %v", err)
	}
	t.Cleanup(func() {
		// The data is thrown away with the test, so there is nothing to
		// stop gracefully; killing is instant.
		if err := n.kill(); err != nil {
			t.Errorf("broker: %v", err)
		}
	})
	return n
}

// StartNode starts a private node and waits until it accepts AMQP
// connections. The caller stops it with Stop.
func StartNode(ctx context.Context, opts Options) (*Node, error) {
	server, err := serverPath()
	if err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, StartTimeout)
		defer cancel()
	}
	if opts.Name == "" {
		opts.Name = "warren-" + randomHex(4)
	}
	if !validName.MatchString(opts.Name) {
		return nil, fmt.Errorf("node name %q: use letters, digits, '-' and '_' only", opts.Name)
	}
	ownsDir := false
	if opts.Dir == "" {
		if opts.Dir, err = os.MkdirTemp("", "warren-broker-"); err != nil {
			return nil, err
		}
		ownsDir = true
	}
	if opts.Dir, err = filepath.Abs(opts.Dir); err != nil {
		return nil, err
	}

	// A port that we picked may be taken by someone else before the node
	// binds it; the node then exits and we try again with other ports.
	for attempt := 1; ; attempt++ {
		n, err := start(ctx, server, opts)
		if err == nil {
			n.ownsDir = ownsDir
			return n, nil
		}
		if opts.Port == 0 && attempt < 3 && errors.Is(err, errPortInUse) && ctx.Err() == nil {
			continue
		}
		if ownsDir {
			os.RemoveAll(opts.Dir)
		}
		return nil, err
	}
}

var (
	validName    = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	errPortInUse = errors.New("a port is in use")
)

func start(ctx context.Context, server string, opts Options) (*Node, error) {
	n := &Node{
		Name:    opts.Name + "@localhost",
		Host:    host,
		Port:    opts.Port,
		Dir:     opts.Dir,
		LogFile: filepath.Join(opts.Dir, "log", opts.Name+".console.log"),
		ctl:     filepath.Join(filepath.Dir(server), "rabbitmqctl"),
	}
	var err error
	if n.Port == 0 {
		if n.Port, err = freePort(); err != nil {
			return nil, err
		}
	}
	if n.DistPort, err = freePort(); err != nil {
		return nil, err
	}
	n.URL = fmt.Sprintf("amqp://guest:guest@%s/", net.JoinHostPort(host, strconv.Itoa(n.Port)))
	if err := n.prepareDir(opts.Config); err != nil {
		return nil, err
	}
	n.env = n.environ()

	logf, err := os.OpenFile(n.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	logStart, _ := logf.Seek(0, io.SeekEnd)

	cmd := exec.Command(server) // not -detached: the node is our child, so we see it exit
	cmd.Env = n.env
	cmd.Dir = n.Dir
	cmd.Stdout = logf
	cmd.Stderr = logf
	release := func() {}
	if opts.Detach {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		err = cmd.Start()
	} else {
		release, err = startTied(cmd)
	}
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", server, err)
	}
	n.PID = cmd.Process.Pid
	exited := make(chan struct{})
	n.exited = exited
	go func() {
		cmd.Wait()
		close(exited)
		release()
	}()
	if err := n.writeState(); err != nil {
		n.kill()
		return nil, err
	}

	if err := n.waitReady(ctx); err != nil {
		n.kill()
		tail := logTail(n.LogFile, logStart, 30)
		if strings.Contains(tail, "eaddrinuse") {
			err = fmt.Errorf("%w: %w", errPortInUse, err)
		}
		return nil, fmt.Errorf("node %s (AMQP port %d) did not start: %w\n--- last lines of %s:\n%s", n.Name, n.Port, err, n.LogFile, tail)
	}
	return n, nil
}

// prepareDir lays out the node's folder: its own HOME with a cookie for the
// node and rabbitmqctl, an empty plugin list, and the optional config.
func (n *Node) prepareDir(config string) error {
	for _, d := range []string{"home", "mnesia", "log"} {
		if err := os.MkdirAll(filepath.Join(n.Dir, d), 0o755); err != nil {
			return err
		}
	}
	cookie := filepath.Join(n.Dir, "home", ".erlang.cookie")
	if _, err := os.Stat(cookie); errors.Is(err, os.ErrNotExist) {
		if err := os.WriteFile(cookie, []byte(strings.ToUpper(randomHex(16))), 0o400); err != nil {
			return err
		}
	}
	files := map[string]string{
		"enabled_plugins":   "[].\n",
		"rabbitmq-env.conf": "", // keeps /etc/rabbitmq/rabbitmq-env.conf out
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(n.Dir, name), []byte(body), 0o644); err != nil {
			return err
		}
	}
	conf := filepath.Join(n.Dir, "rabbitmq.conf")
	if config == "" {
		if err := os.Remove(conf); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	return os.WriteFile(conf, []byte(config), 0o644)
}

// environ is the node's environment, shared by rabbitmqctl: everything is
// its own, and nothing comes from /etc/rabbitmq.
func (n *Node) environ() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "RABBITMQ_") || strings.HasPrefix(k, "ERL_") || k == "HOME" {
			continue
		}
		env = append(env, kv)
	}
	d := func(name string) string { return filepath.Join(n.Dir, name) }
	return append(env,
		"HOME="+d("home"),
		"RABBITMQ_NODENAME="+n.Name,
		"RABBITMQ_NODE_IP_ADDRESS="+host,
		"RABBITMQ_NODE_PORT="+strconv.Itoa(n.Port),
		"RABBITMQ_DIST_PORT="+strconv.Itoa(n.DistPort),
		"RABBITMQ_MNESIA_BASE="+d("mnesia"),
		"RABBITMQ_LOG_BASE="+d("log"),
		"RABBITMQ_ENABLED_PLUGINS_FILE="+d("enabled_plugins"),
		"RABBITMQ_CONFIG_FILE="+d("rabbitmq"), // the .conf suffix is implied; the file may be absent
		"RABBITMQ_ADVANCED_CONFIG_FILE="+d("advanced.config"),
		"RABBITMQ_CONF_ENV_FILE="+d("rabbitmq-env.conf"),
		"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}",
		"ERL_EPMD_ADDRESS="+host,
		// Makes the script exec the VM instead of staying in between as
		// its parent: the node's pid is then ours to signal and to wait
		// for, and the parent-death signal reaches the VM itself.
		"NOTIFY_SOCKET="+d("notify.sock"),
		// rabbitmqctl listens on one port of this range while it runs; the
		// default range of 11 ports is too small for many parallel tests.
		"RABBITMQ_CTL_DIST_PORT_MIN=35672",
		"RABBITMQ_CTL_DIST_PORT_MAX=36671",
	)
}

// waitReady waits until the node answers AMQP as itself: a node that lost
// the race for its port must not take another node's answer for its own.
func (n *Node) waitReady(ctx context.Context) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if id, err := identify(ctx, n.URL); err == nil && id == n.shortName() {
			return nil
		}
		select {
		case <-n.exited:
			return errors.New("the node exited")
		case <-ctx.Done():
			return fmt.Errorf("no AMQP answer: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

func (n *Node) shortName() string {
	short, _, _ := strings.Cut(n.Name, "@")
	return short
}

// Running reports whether the node's process is alive.
func (n *Node) Running() bool {
	if n.exited != nil {
		select {
		case <-n.exited:
			return false
		default:
			return true
		}
	}
	return isNodeProcess(n.PID, filepath.Join(n.Dir, "home"))
}

// Stop stops the node gracefully (killing it if it does not stop within
// 30s) and waits until its process is gone. It is safe to call twice.
func (n *Node) Stop() error {
	n.stopOnce.Do(func() { n.stopErr = n.stop(syscall.SIGTERM, stopTimeout) })
	return n.stopErr
}

// kill stops the node at once; for nodes whose data is thrown away.
func (n *Node) kill() error {
	n.stopOnce.Do(func() { n.stopErr = n.stop(syscall.SIGKILL, 0) })
	return n.stopErr
}

func (n *Node) stop(sig syscall.Signal, grace time.Duration) error {
	defer func() {
		if n.ownsDir {
			os.RemoveAll(n.Dir)
		}
	}()
	if !n.Running() {
		return nil
	}
	// A graceful stop goes to the node alone: its helper processes
	// (erl_child_setup) must stay while it shuts down.
	if sig != syscall.SIGKILL {
		syscall.Kill(n.PID, sig)
		if n.waitExit(grace) {
			return nil
		}
	}
	// The node runs in a process group of its own (a session when
	// detached), so a kill reaches its helpers too.
	killGroup(n.PID)
	if !n.waitExit(10 * time.Second) {
		return fmt.Errorf("node %s (pid %d) did not exit", n.Name, n.PID)
	}
	return nil
}

func killGroup(pid int) {
	if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

func (n *Node) waitExit(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if !n.Running() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		if n.exited != nil {
			select {
			case <-n.exited:
				return true
			case <-time.After(time.Until(deadline)):
				return false
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StopApp stops the RabbitMQ application inside the running node: clients
// are disconnected and the port stops answering, like a broker restart.
func (n *Node) StopApp() error {
	return n.ctlDo("stop_app")
}

// StartApp starts the RabbitMQ application again after StopApp and waits
// until AMQP answers.
func (n *Node) StartApp() error {
	if err := n.ctlDo("start_app"); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	if err := n.waitReady(ctx); err != nil {
		return fmt.Errorf("node %s after start_app: %w", n.Name, err)
	}
	return nil
}

// SetMemoryAlarm raises (on) or clears the node's memory alarm by setting
// the memory high watermark to 0.0001 or 0.4. While it is raised,
// publishing connections are blocked: a publish hangs, it does not fail.
func (n *Node) SetMemoryAlarm(on bool) error {
	mark := "0.4"
	if on {
		mark = "0.0001"
	}
	return n.ctlDo("set_vm_memory_high_watermark", mark)
}

// CloseAllConnections closes every client connection with the reason.
func (n *Node) CloseAllConnections(reason string) error {
	return n.ctlDo("close_all_connections", reason)
}

// AddUser adds a user with a password and no permissions.
func (n *Node) AddUser(user, pass string) error {
	return n.ctlDo("add_user", user, pass)
}

// SetPermissions sets a user's configure, write and read permissions (each
// a regular expression over resource names) on a vhost.
func (n *Node) SetPermissions(user, vhost, configure, write, read string) error {
	return n.ctlDo("set_permissions", "-p", vhost, user, configure, write, read)
}

// AddVhost adds a virtual host.
func (n *Node) AddVhost(name string) error {
	return n.ctlDo("add_vhost", name)
}

// UserURL is the node's URL for another user and vhost ("" means "/").
func (n *Node) UserURL(user, pass, vhost string) string {
	u := url.URL{
		Scheme: "amqp",
		User:   url.UserPassword(user, pass),
		Host:   net.JoinHostPort(n.Host, strconv.Itoa(n.Port)),
		Path:   "/" + vhost,
	}
	if vhost == "" || vhost == "/" {
		u.Path = "/"
	}
	return u.String()
}

// Ctl runs rabbitmqctl against the node and returns what it printed.
func (n *Node) Ctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, n.ctl, append([]string{"-n", n.Name}, args...)...)
	cmd.Env = n.env
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String() + "\n" + stdout.String())
		return stdout.String(), fmt.Errorf("rabbitmqctl -n %s %s: %w: %s", n.Name, strings.Join(args, " "), err, firstLines(msg, 5))
	}
	return stdout.String(), nil
}

func (n *Node) ctlDo(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	defer cancel()
	_, err := n.Ctl(ctx, args...)
	return err
}

// state is what a folder remembers of the node that last ran on it.
type state struct {
	Name     string `json:"name"`
	Port     int    `json:"port"`
	DistPort int    `json:"dist_port"`
	PID      int    `json:"pid"`
	Ctl      string `json:"ctl"`
}

const stateFile = "node.json"

func (n *Node) writeState() error {
	b, err := json.MarshalIndent(state{n.Name, n.Port, n.DistPort, n.PID, n.ctl}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(n.Dir, stateFile), append(b, '\n'), 0o644)
}

// Lookup returns the node that was last started with its data in dir, if
// it still runs (in this process or another), and ErrNotRunning otherwise.
func Lookup(dir string) (*Node, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s has no node", ErrNotRunning, dir)
	}
	if err != nil {
		return nil, err
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, stateFile), err)
	}
	n := &Node{
		Name:     s.Name,
		Host:     host,
		Port:     s.Port,
		DistPort: s.DistPort,
		URL:      fmt.Sprintf("amqp://guest:guest@%s/", net.JoinHostPort(host, strconv.Itoa(s.Port))),
		Dir:      dir,
		PID:      s.PID,
		ctl:      s.Ctl,
	}
	n.LogFile = filepath.Join(dir, "log", n.shortName()+".console.log")
	n.env = n.environ()
	if !n.Running() {
		return nil, fmt.Errorf("%w: node %s (pid %d) of %s has stopped", ErrNotRunning, n.Name, n.PID, dir)
	}
	return n, nil
}

// isNodeProcess tells whether pid is alive and is the node whose HOME is
// home (its command line names it), so a reused pid is not taken for it.
func isNodeProcess(pid int, home string) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return true // no /proc: trust the pid
	}
	return bytes.Contains(cmdline, []byte("\x00-home\x00"+home+"\x00"))
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// testName turns a test's name into part of a node name.
func testName(name string) string {
	name = strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			return r
		}
		return '_'
	}, name)
	if len(name) > 40 {
		name = name[:40]
	}
	return name
}

// logTail returns the last lines of a log written after offset.
func logTail(path string, offset int64, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read the log: %v)", err)
	}
	if offset > 0 && offset <= int64(len(b)) {
		b = b[offset:]
	}
	return lastLines(string(b), lines)
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}
