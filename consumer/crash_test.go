package consumer_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/test/testenv"
)

var (
	crashBinOnce sync.Once
	crashBin     string
	crashBinErr  error
)

// crashConsumer builds consumer/internal/crashconsumer once per test run.
func crashConsumer(t *testing.T) string {
	t.Helper()
	crashBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "warren-crashconsumer-")
		if err != nil {
			crashBinErr = err
			return
		}
		crashBin = filepath.Join(dir, "crashconsumer")
		out, err := exec.Command("go", "build", "-o", crashBin, "github.com/warrenmq/warren/consumer/internal/crashconsumer").CombinedOutput()
		if err != nil {
			crashBinErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	require.NoError(t, crashBinErr)
	return crashBin
}

// proc is one run of the crash consumer.
type proc struct {
	cmd   *exec.Cmd
	ready chan struct{}
	done  chan error
}

func startProc(t *testing.T, b *testBundle, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(crashConsumer(t), append([]string{"-db", b.dbPath, "-url", testenv.URL(), "-app", b.name, "-from", b.producer}, args...)...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	p := &proc{cmd: cmd, ready: make(chan struct{}), done: make(chan error, 1)}
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			if s.Text() == "ready" {
				close(p.ready)
			}
		}
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return p
}

func (p *proc) waitReady(t *testing.T) bool {
	t.Helper()
	select {
	case <-p.ready:
		return true
	case err := <-p.done:
		p.done <- err
		return false
	case <-time.After(30 * time.Second):
		t.Fatal("the crash consumer did not get ready in 30s")
		return false
	}
}

func TestKillNineWhileHandling(t *testing.T) {
	t.Parallel()
	const n, kills = 30_000, 10
	b := setup(t)
	ctx := context.Background()
	cfg := b.track(consumer.Config{Consumer: b.name, DB: b.db, From: b.cfg.From, RetryDelays: []time.Duration{100 * time.Millisecond}})
	crashConsumer(t)
	require.NoError(t, consumer.DeclareTopology(ctx, b.conn, cfg))
	evs := make([]amqp.Publishing, n)
	for i := range evs {
		evs[i] = b.event(fmt.Sprintf("0192b3a4-0000-7000-8000-%012d", i))
	}
	b.publish(t, "", publisher.QueueName(b.name), evs...)

	processed := func() int { return b.count(t, `SELECT count(*) FROM warren_inbox WHERE status = 'processed'`) }
	start := time.Now()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	var atKill []int
	for range kills {
		p := startProc(t, b)
		require.True(t, p.waitReady(t), "the crash consumer exited before it was ready")
		time.Sleep(time.Duration(50+rng.IntN(250)) * time.Millisecond)
		require.NoError(t, p.cmd.Process.Signal(syscall.SIGKILL))
		<-p.done
		atKill = append(atKill, processed())
	}
	t.Logf("processed rows at each kill: %v", atKill)
	require.Less(t, atKill[len(atKill)-1], n, "every kill should come while deliveries are handled: publish more")

	p := startProc(t, b)
	require.True(t, p.waitReady(t))
	require.Eventually(t, func() bool { return processed() == n }, 2*time.Minute, 50*time.Millisecond,
		"processed %d of %d", processed(), n)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.NoError(t, <-p.done, "clean stop")
	elapsed := time.Since(start)

	require.Equal(t, n, b.count(t, `SELECT count(*) FROM effects`), "one effect per event")
	require.Equal(t, n, b.count(t, `SELECT count(DISTINCT message_id) FROM effects`))
	require.Equal(t, n, b.count(t, `SELECT count(*) FROM warren_inbox`), "one row per event, all processed")
	require.Zero(t, b.depth(t, publisher.QueueName(b.name)))
	require.Zero(t, b.depth(t, publisher.PoisonQueueName(b.name)))
	st, err := inbox.Stats(ctx, b.db, b.name)
	require.NoError(t, err)
	t.Logf("%d events, %d kills -9, %s: %d duplicate deliveries absorbed (committed, then the kill lost the ack)",
		n, kills, elapsed.Round(time.Millisecond), st.Duplicates)
}

func TestCrashingHandlerEndsInPoison(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	cfg := b.track(consumer.Config{Consumer: b.name, DB: b.db, From: b.cfg.From, RetryDelays: []time.Duration{100 * time.Millisecond}, MaxAttempts: 3})
	require.NoError(t, consumer.DeclareTopology(ctx, b.conn, cfg))
	b.publish(t, "", publisher.QueueName(b.name), b.event("pill"), b.event("fine-1"), b.event("fine-2"))

	runs := 0
	for ; runs < 10; runs++ {
		p := startProc(t, b, "-pill", "pill", "-max-attempts", strconv.Itoa(cfg.MaxAttempts), "-concurrency", "1")
		if !p.waitReady(t) {
			continue
		}
		var err error
		select {
		case err = <-p.done: // killed itself on the pill
		case <-time.After(2 * time.Second):
		}
		if err != nil {
			continue
		}
		require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
		require.NoError(t, <-p.done)
		break
	}
	t.Logf("the pill killed the consumer %d times before it was poisoned", runs)
	require.LessOrEqual(t, runs, cfg.MaxAttempts+1)
	require.Equal(t, 1, b.depth(t, publisher.PoisonQueueName(b.name)))
	e := b.entry(t, "pill")
	require.Equal(t, inbox.StatusPoisoned, e.Status)
	require.Contains(t, e.LastError, "never finished")
	require.Equal(t, 2, b.count(t, `SELECT count(*) FROM effects`))
}
