package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/schollz/progressbar/v3"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

const (
	defaultURL = publisher.DefaultURL
	defaultPG  = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
)

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func redact(u string) string { return publisher.RedactURL(u) }

// bench holds what the phases share: the broker connection used for
// topology and queue depths, the temporary folder with the databases and
// the warren binary, the run's names and the cleanups.
type bench struct {
	o         options
	id        string // the run's suffix, in every name
	dir       string
	conn      *amqp.Connection
	machine   machine
	bin       string // warren, built once
	brokerPID int    // the broker's process, for CPU accounting (0: unknown)
	// brokerBusy: settle found the broker busy past settleMax once.
	brokerBusy bool
	seq        atomic.Int64 // numbers databases and queues within the run

	mu       sync.Mutex
	declared bool           // the producer's exchange is declared
	cleanups []func() error // run in reverse order
}

func newBench(ctx context.Context, o options) (*bench, error) {
	idb := make([]byte, 3)
	_, _ = rand.Read(idb)
	b := &bench{o: o, id: hex.EncodeToString(idb)}
	dir, err := os.MkdirTemp("", "warren-bench-")
	if err != nil {
		return nil, err
	}
	b.dir = dir
	b.defer_(func() error { return os.RemoveAll(dir) })

	b.conn, err = publisher.Dial(ctx, publisher.ConnectionConfig{URL: o.url})
	if err != nil {
		_ = b.cleanup()
		return nil, err
	}
	b.defer_(b.conn.Close)
	b.machine = describeMachine(b.conn)
	b.brokerPID = brokerPID(o.url)

	if o.runs(2) || o.runs(4) || o.runs(6) {
		b.logf("building warren (go build ./cmd/warren)")
		b.bin = filepath.Join(dir, "warren")
		build := exec.CommandContext(ctx, "go", "build", "-o", b.bin, "./cmd/warren")
		build.Dir = moduleRoot()
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			_ = b.cleanup()
			return nil, fmt.Errorf("build warren: %w", err)
		}
	}
	return b, nil
}

// moduleRoot is the repository root: this file is test/bench/bench.go.
func moduleRoot() string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "."
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// defer_ registers a cleanup; cleanups run last-registered first.
func (b *bench) defer_(f func() error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.cleanups = append(b.cleanups, f)
}

func (b *bench) cleanup() error {
	b.mu.Lock()
	fs := b.cleanups
	b.cleanups = nil
	b.mu.Unlock()
	var errs []error
	for i := len(fs) - 1; i >= 0; i-- {
		if err := fs[i](); err != nil && !errors.Is(err, amqp.ErrClosed) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	return nil
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

// name returns a name unique to this run: "bench-<id>-<what>".
func (b *bench) name(what string) string { return "bench-" + b.id + "-" + what }

// quietLogger discards everything below warnings.
func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// stderrIsTerminal says whether progress bars can redraw in place.
func stderrIsTerminal() bool {
	fi, err := os.Stderr.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// newBar returns a progress bar on stderr; on a pipe it draws nothing and
// the phase's summary line says what happened.
func newBar(max int, desc string) *progressbar.ProgressBar {
	return progressbar.NewOptions(max,
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionSetVisibility(stderrIsTerminal()),
		progressbar.OptionSetDescription(fmt.Sprintf("%-34s", desc)),
		progressbar.OptionSetWidth(30),
		progressbar.OptionShowCount(),
		progressbar.OptionShowIts(),
		progressbar.OptionSetItsString("msg"),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionSetElapsedTime(true),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionClearOnFinish(),
	)
}

// payload returns event i's JSON payload: payloadSize bytes, the same shape
// in every phase.
func payload(i int) []byte {
	head := fmt.Sprintf(`{"company_id":"company-%06d","seq":%d,"name":"Company %06d","status":"active","country":"DE","updated_by":"bench","note":"`,
		i%aggregates, i, i%aggregates)
	const tail = `"}`
	fill := payloadSize - len(head) - len(tail)
	if fill < 0 {
		fill = 0
	}
	return []byte(head + strings.Repeat("x", fill) + tail)
}

// event returns event i of producer: aggregate "company" i%1000.
func event(producer string, i int) outbox.Event {
	return outbox.Event{
		Producer:      producer,
		Type:          eventType,
		AggregateType: "company",
		AggregateID:   fmt.Sprint(i % aggregates),
		Payload:       payload(i),
	}
}

// newDB creates and migrates a SQLite database in the run's folder.
func (b *bench) newDB(ctx context.Context, name string) (*sql.DB, string, error) {
	path := filepath.Join(b.dir, name+".db")
	db, err := wsql.Open(ctx, path, wsql.Options{})
	if err != nil {
		return nil, "", err
	}
	if _, err := wsql.Migrate(ctx, db); err != nil {
		_ = db.Close()
		return nil, "", err
	}
	return db, path, nil
}

// removeDB deletes a database file and its companions.
func removeDB(path string) {
	for _, suffix := range []string{"", "-wal", "-shm", ".relay.lock"} {
		_ = os.Remove(path + suffix)
	}
}

// fillOutbox appends n events of producer to the database at path with
// outbox.AppendDB in transactions of 10,000, then checkpoints the WAL, as a
// backlog that built up over time would be.
func fillOutbox(ctx context.Context, path, producer string, n int) error {
	// The filler does not need durability: nothing runs until it is done.
	db, err := wsql.Open(ctx, path, wsql.Options{Synchronous: "OFF"})
	if err != nil {
		return err
	}
	defer db.Close()
	bar := newBar(n, "fill outbox")
	defer bar.Finish()
	const perTx = 10_000
	evs := make([]outbox.Event, 0, perTx)
	for i := 0; i < n; {
		evs = evs[:0]
		for j := 0; j < perTx && i+j < n; j++ {
			evs = append(evs, event(producer, i+j))
		}
		if _, err := outbox.AppendDB(ctx, db, evs...); err != nil {
			return fmt.Errorf("fill outbox: %w", err)
		}
		i += len(evs)
		_ = bar.Set(i)
	}
	if _, err := db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		return fmt.Errorf("fill outbox: checkpoint: %w", err)
	}
	return nil
}

// proc is a warren process started by the bench.
type proc struct {
	cmd     *exec.Cmd
	started chan time.Time // receives when it logs "relay started"
	done    chan struct{}
	err     error
	mu      sync.Mutex
	tail    []string // its last log lines
}

// startWarren runs `warren args...` with env added; the process is killed
// if the bench dies.
func (b *bench) startWarren(env []string, args ...string) (*proc, error) {
	cmd := exec.Command(b.bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = sysProcAttr()
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start warren %v: %w", args, err)
	}
	p := &proc{cmd: cmd, started: make(chan time.Time, 1), done: make(chan struct{})}
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if b.o.verbose {
				fmt.Fprintln(os.Stderr, "  warren:", line)
			}
			if strings.Contains(line, "relay started") {
				select {
				case p.started <- time.Now():
				default:
				}
			}
			p.mu.Lock()
			p.tail = append(p.tail, line)
			if len(p.tail) > 20 {
				p.tail = p.tail[1:]
			}
			p.mu.Unlock()
		}
	}()
	go func() {
		<-scanned
		p.err = cmd.Wait()
		close(p.done)
	}()
	b.defer_(func() error { p.kill(); return nil })
	return p, nil
}

// output returns the process's last log lines.
func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.tail, "\n")
}

// stop sends SIGTERM and waits up to d for the process to exit, then kills
// it.
func (p *proc) stop(d time.Duration) error {
	select {
	case <-p.done:
		return p.err
	default:
	}
	_ = p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
		return p.err
	case <-time.After(d):
		p.kill()
		return fmt.Errorf("warren did not stop within %s; killed", d)
	}
}

func (p *proc) kill() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// waitStarted waits for the "relay started" line.
func (p *proc) waitStarted(ctx context.Context, d time.Duration) (time.Time, error) {
	select {
	case t := <-p.started:
		return t, nil
	case <-p.done:
		return time.Time{}, fmt.Errorf("warren relay exited before it started: %v\n%s", p.err, p.output())
	case <-time.After(d):
		return time.Time{}, fmt.Errorf("warren relay did not start within %s:\n%s", d, p.output())
	case <-ctx.Done():
		return time.Time{}, ctx.Err()
	}
}
