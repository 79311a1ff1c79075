// Command brokerctl gives the project's tasks a RabbitMQ broker.
//
//	go tool brokerctl ensure [-server] -- CMD ARGS...
//	go tool brokerctl status
//	go tool brokerctl stop
//
// ensure uses the broker at WARREN_URL (default
// amqp://guest:guest@localhost:5672/) if it answers; otherwise, when that URL
// is on this machine, it starts a private RabbitMQ node there with its data
// in .warren/rabbitmq of the repository, installing rabbitmq-server first if
// it is missing and that is allowed (root or passwordless sudo, and
// WARREN_NO_INSTALL not set). It prints one line saying which broker is used,
// then runs CMD with WARREN_URL set to it and exits with CMD's exit code.
// The node stays up for the next run, unless CI is set. -server makes sure
// rabbitmq-server is installed even when a broker answers: tests that stop a
// broker or raise its alarm start private nodes of their own.
//
// status says whether the private node runs and answers; stop stops it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/warrenmq/warren/test/broker"
)

const defaultURL = "amqp://guest:guest@localhost:5672/"

func main() {
	flag.Usage = usage
	flag.Parse()
	if flag.NArg() == 0 {
		usage()
		os.Exit(2)
	}
	var code int
	switch flag.Arg(0) {
	case "ensure":
		code = ensure(flag.Args()[1:])
	case "status":
		code = status()
	case "stop":
		code = stop()
	default:
		usage()
		code = 2
	}
	os.Exit(code)
}

func usage() {
	fmt.Fprint(os.Stderr, `usage:
  brokerctl ensure [-server] -- CMD ARGS...   run CMD with WARREN_URL set to a broker that answers
  brokerctl status                            say whether the private node runs
  brokerctl stop                              stop the private node
`)
}

func ensure(args []string) int {
	fs := flag.NewFlagSet("ensure", flag.ContinueOnError)
	needServer := fs.Bool("server", false, "make sure rabbitmq-server is installed even when a broker answers (tests start private nodes)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "brokerctl ensure: no command given after --")
		return 2
	}
	dir, err := dataDir()
	if err != nil {
		return fail(err)
	}
	rawURL, from := os.Getenv("WARREN_URL"), "WARREN_URL"
	if rawURL == "" {
		rawURL, from = defaultURL, "the default URL"
	}

	ctx := context.Background()
	say := func(s string) { fmt.Fprintln(os.Stderr, "warren: "+s) }
	if *needServer {
		if err := broker.EnsureInstalled(ctx, say); err != nil {
			return fail(fmt.Errorf("tests that stop a broker or raise its alarm start private nodes, and %w", err))
		}
	}
	r, err := broker.EnsureNode(ctx, rawURL, dir, say)
	if err != nil {
		return fail(err)
	}
	shown := redact(r.URL)
	rel := relative(dir)
	stopAfter := r.Started && os.Getenv("CI") != ""
	switch {
	case r.Started && stopAfter:
		say(fmt.Sprintf("no broker answered at %s (%s), so started a private RabbitMQ node there in %.1fs (%s, data and log in %s); it is stopped after the command because CI is set",
			shown, from, r.Took.Seconds(), r.Node.Name, rel))
	case r.Started:
		say(fmt.Sprintf("no broker answered at %s (%s), so started a private RabbitMQ node there in %.1fs (%s, data and log in %s); it stays up for the next run: `go tool task broker:stop` stops it",
			shown, from, r.Took.Seconds(), r.Node.Name, rel))
	case isOurs(dir, r.URL):
		say(fmt.Sprintf("using the private RabbitMQ node at %s (%s) that an earlier run started in %s; `go tool task broker:stop` stops it", shown, from, rel))
	default:
		say(fmt.Sprintf("using the broker at %s (%s)", shown, from))
	}

	code := run(fs.Args(), r.URL)
	if stopAfter {
		if err := r.Node.Stop(); err != nil {
			say(err.Error())
		} else {
			say("stopped the private RabbitMQ node " + r.Node.Name)
		}
	}
	return code
}

// run runs the command with WARREN_URL set, passing signals on, and returns
// its exit code (128+signal when a signal ended it, as a shell does).
func run(argv []string, brokerURL string) int {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "WARREN_URL="+brokerURL)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(signals)
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "warren: %v\n", err)
		return 127
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case s := <-signals:
				cmd.Process.Signal(s)
			case <-done:
				return
			}
		}
	}()
	err := cmd.Wait()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return exit.ExitCode()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "warren: %v\n", err)
		return 1
	}
	return 0
}

func status() int {
	dir, err := dataDir()
	if err != nil {
		return fail(err)
	}
	n, err := broker.Lookup(dir)
	if errors.Is(err, broker.ErrNotRunning) {
		fmt.Printf("no private RabbitMQ node runs (data in %s)\n", relative(dir))
		return 0
	}
	if err != nil {
		return fail(err)
	}
	answers := "answers"
	if !broker.Answers(context.Background(), n.URL) {
		answers = "does not answer"
	}
	fmt.Printf("private RabbitMQ node %s (pid %d) runs and %s at %s; data and log in %s\n",
		n.Name, n.PID, answers, redact(n.URL), relative(dir))
	return 0
}

func stop() int {
	dir, err := dataDir()
	if err != nil {
		return fail(err)
	}
	n, err := broker.Lookup(dir)
	if errors.Is(err, broker.ErrNotRunning) {
		fmt.Println("no private RabbitMQ node runs")
		return 0
	}
	if err != nil {
		return fail(err)
	}
	if err := n.Stop(); err != nil {
		return fail(err)
	}
	fmt.Printf("stopped the private RabbitMQ node %s (its data stays in %s)\n", n.Name, relative(dir))
	return 0
}

// isOurs tells whether the broker at brokerURL is the private node in dir.
func isOurs(dir, brokerURL string) bool {
	n, err := broker.Lookup(dir)
	if err != nil {
		return false
	}
	u, err := url.Parse(brokerURL)
	if err != nil {
		return false
	}
	port := u.Port()
	if port == "" {
		port = "5672"
	}
	return port == strconv.Itoa(n.Port)
}

// dataDir is .warren/rabbitmq in the repository: the folder of go.mod.
func dataDir() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(dir, ".warren", "rabbitmq"), nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("brokerctl: run it inside the warren repository (no go.mod found)")
		}
		dir = parent
	}
}

func relative(dir string) string {
	if wd, err := os.Getwd(); err == nil {
		if rel, err := filepath.Rel(wd, dir); err == nil {
			return rel
		}
	}
	return dir
}

func redact(rawURL string) string {
	if u, err := url.Parse(rawURL); err == nil {
		return u.Redacted()
	}
	return "(unparsable URL)"
}

func fail(err error) int {
	fmt.Fprintln(os.Stderr, "warren: "+err.Error())
	return 1
}
