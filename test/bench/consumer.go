package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"runtime/trace"
	"strings"
	"sync/atomic"
	"time"

	sqlite3 "github.com/mattn/go-sqlite3"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

// consumerConfig is the consumer the figures use: the defaults (32
// handlers, prefetch 64 on one channel, a quorum queue) reading every
// event of producer.
func (b *bench) consumerConfig(name, producer string, db *sql.DB) consumer.Config {
	return consumer.Config{
		Consumer:   name,
		DB:         db,
		From:       []consumer.Subscription{{Producer: producer}},
		Connection: publisher.ConnectionConfig{URL: b.o.url},
		Logger:     quietLogger(),
	}.WithDefaults()
}

// deleteConsumerQueues deletes a consumer's queue, retry queues and poison
// queue now and at the end of the run; it returns the func that does it.
func (b *bench) deleteConsumerQueues(cfg consumer.Config) func() {
	names := []string{publisher.QueueName(cfg.Consumer), publisher.PoisonQueueName(cfg.Consumer)}
	for _, d := range cfg.RetryDelays {
		names = append(names, publisher.RetryQueueName(cfg.Consumer, d))
	}
	del := func() {
		for _, q := range names {
			_ = b.deleteQueue(q)
		}
	}
	b.defer_(func() error { del(); return nil })
	return del
}

// consume is figure 3: the consumer turning n queued messages into
// processed inbox rows, and raw consume-and-ack of n messages on one
// channel with the same prefetch. With rawFirst the raw baseline runs
// first: the rounds of --repeat alternate the order, so that neither side
// always runs while the broker still cleans up after the other (the
// deleted queue of the one before).
func (b *bench) consume(ctx context.Context, n int, rawFirst bool) (rate, rate, string, error) {
	producer, err := b.producer(ctx)
	if err != nil {
		return rate{}, rate{}, "", err
	}
	msgs, err := warrenPublishings(producer, n)
	if err != nil {
		return rate{}, rate{}, "", err
	}
	k := b.seq.Add(1)
	cfg := b.consumerConfig(b.name(fmt.Sprintf("c%d", k)), producer, nil)
	setup := fmt.Sprintf("1 channel, prefetch %d, %d handlers", cfg.Prefetch, cfg.Concurrency)
	var cr, rr rate
	warren := func() (err error) {
		cr, err = b.consumeWarren(ctx, cfg, producer, msgs, setup)
		return err
	}
	raw := func() (err error) {
		rr, err = b.consumeRaw(ctx, k, producer, msgs, cfg.Prefetch, setup)
		return err
	}
	first, second := warren, raw
	if rawFirst {
		first, second = raw, warren
	}
	if err := first(); err != nil {
		return rate{}, rate{}, "", err
	}
	if err := second(); err != nil {
		return rate{}, rate{}, "", err
	}
	return cr, rr, setup, nil
}

// consumeWarren drains n queued messages with warren's consumer (cfg, on
// a database of its own) and deletes its queues.
func (b *bench) consumeWarren(ctx context.Context, cfg consumer.Config, producer string, msgs []amqp.Publishing, setup string) (rate, error) {
	n := len(msgs)
	db, path, err := b.newDB(ctx, cfg.Consumer)
	if err != nil {
		return rate{}, err
	}
	defer removeDB(path)
	defer db.Close()
	cfg.DB = db
	del := b.deleteConsumerQueues(cfg)
	defer del()
	if err := consumer.DeclareTopology(ctx, b.conn, cfg); err != nil {
		return rate{}, err
	}
	queue := publisher.QueueName(cfg.Consumer)
	if err := b.fillQueue(ctx, producer, queue, msgs); err != nil {
		return rate{}, err
	}

	var handled atomic.Int64
	c, err := consumer.New(cfg, consumer.HandlerFunc(func(context.Context, *sql.Tx, *consumer.Delivery) error {
		handled.Add(1)
		return nil
	}))
	if err != nil {
		return rate{}, err
	}
	bar := newBar(n, "3 consumer: queue to inbox")
	stopBar := follow(bar, &handled)
	stopProfile, err := b.cpuProfile("consumer-cpu.pprof")
	if err != nil {
		stopBar()
		return rate{}, err
	}
	b.settle(ctx, "3 consumer")
	m := b.meter(0)
	start := time.Now()
	if err := c.Start(ctx); err != nil {
		stopBar()
		stopProfile()
		return rate{}, err
	}
	end, err := waitInbox(ctx, db, cfg.Consumer, n, &handled, c.Stopped(), 10*time.Minute)
	cpu := m.stop()
	stopProfile()
	stopBar()
	if serr := c.Stop(context.Background()); err == nil && serr != nil {
		err = serr
	}
	if err != nil {
		return rate{}, err
	}
	cr := rate{N: n, Took: end.Sub(start), CPU: cpu}
	b.logf("figure 3: consumer turned %d queued messages into inbox rows in %s: %.0f msgs/s (%s; %s)", n, cr.Took.Round(time.Millisecond), cr.PerSec(), setup, cpu)
	del() // nothing else may receive the raw baseline's messages
	return cr, nil
}

// consumeRaw drains n queued messages with raw amqp091-go consume-and-ack
// (one channel, prefetch) from a quorum queue of its own, then deletes it.
func (b *bench) consumeRaw(ctx context.Context, k int64, producer string, msgs []amqp.Publishing, prefetch int, setup string) (rate, error) {
	n := len(msgs)
	raw := b.name(fmt.Sprintf("raw-%d", k))
	delRaw, err := b.quorumQueue(raw, publisher.ExchangeName(producer))
	if err != nil {
		return rate{}, err
	}
	defer delRaw() // nothing else may receive the consumer's messages
	if err := b.fillQueue(ctx, producer, raw, msgs); err != nil {
		return rate{}, err
	}
	b.settle(ctx, "3 raw consume-and-ack")
	m := b.meter(0)
	took, err := rawConsume(ctx, b.o.url, raw, n, 1, prefetch, newBar(n, "3 raw consume-and-ack"))
	if err != nil {
		return rate{}, err
	}
	rr := rate{N: n, Took: took, CPU: m.stop()}
	b.logf("figure 3: raw consume-and-ack of %d messages in %s: %.0f msgs/s (%s; %s)", n, took.Round(time.Millisecond), rr.PerSec(), setup, rr.CPU)
	return rr, nil
}

// cpuProfile starts a CPU profile of this process into name in the
// --profile folder, and returns the func that stops it; without --profile
// it does nothing.
func (b *bench) cpuProfile(name string) (func(), error) {
	if b.o.profile == "" {
		return func() {}, nil
	}
	if err := os.MkdirAll(b.o.profile, 0o755); err != nil {
		return nil, err
	}
	f, err := os.Create(filepath.Join(b.o.profile, name))
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return nil, err
	}
	// And an execution trace: where the goroutines wait (go tool trace
	// -pprof=sched|sync|syscall).
	tracePath := strings.TrimSuffix(f.Name(), "-cpu.pprof") + ".trace"
	tf, err := os.Create(tracePath)
	if err != nil {
		pprof.StopCPUProfile()
		_ = f.Close()
		return nil, err
	}
	if err := trace.Start(tf); err != nil {
		pprof.StopCPUProfile()
		_ = f.Close()
		_ = tf.Close()
		return nil, err
	}
	b.logf("CPU profile of this process in %s, execution trace in %s", f.Name(), tracePath)
	return func() {
		trace.Stop()
		_ = tf.Close()
		pprof.StopCPUProfile()
		_ = f.Close()
	}, nil
}

// fillQueue publishes msgs to the producer's exchange and waits until queue
// holds them all.
func (b *bench) fillQueue(ctx context.Context, producer, queue string, msgs []amqp.Publishing) error {
	if _, err := rawPublish(ctx, b.o.url, publisher.ExchangeName(producer), msgs, window, newBar(len(msgs), "fill queue")); err != nil {
		return fmt.Errorf("fill queue %s: %w", queue, err)
	}
	_, err := b.waitDepth(ctx, queue, len(msgs), time.Minute, nil)
	return err
}

// waitInbox waits until the handler ran n times and the inbox holds n
// processed rows, and returns the last processed_at.
func waitInbox(ctx context.Context, db *sql.DB, name string, n int, handled *atomic.Int64, stopped <-chan struct{}, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		if handled.Load() >= int64(n) {
			var count int
			var last sql.NullString
			err := db.QueryRowContext(ctx, `SELECT count(*), max(processed_at) FROM warren_inbox WHERE consumer = ? AND status = 'processed'`, name).Scan(&count, &last)
			if err != nil {
				return time.Time{}, fmt.Errorf("read inbox: %w", err)
			}
			if count >= n {
				return wsql.ParseTime(last.String)
			}
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("%d of %d deliveries handled after %s", handled.Load(), n, timeout)
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-stopped:
			return time.Time{}, fmt.Errorf("the consumer stopped after %d of %d deliveries", handled.Load(), n)
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
}

// commitConnector opens the SQLite database as wsql.Open does, and calls
// onCommit after every successful commit on it: the end-to-end figure
// stamps inbox rows with the moment their transaction committed, which
// processed_at (written inside the transaction, in milliseconds) does not
// say. It wraps go-sqlite3's connection without hiding any of the
// interfaces database/sql uses, so the consumer runs as fast as on a plain
// *sql.DB.
type commitConnector struct {
	dsn      string
	onCommit func()
	drv      *sqlite3.SQLiteDriver
}

var _ driver.Connector = (*commitConnector)(nil)

func (c *commitConnector) Connect(context.Context) (driver.Conn, error) {
	conn, err := c.drv.Open(c.dsn)
	if err != nil {
		return nil, err
	}
	return &commitConn{SQLiteConn: conn.(*sqlite3.SQLiteConn), onCommit: c.onCommit}, nil
}

func (c *commitConnector) Driver() driver.Driver { return c.drv }

type commitConn struct {
	*sqlite3.SQLiteConn
	onCommit func()
}

func (c *commitConn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *commitConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	tx, err := c.SQLiteConn.BeginTx(ctx, opts)
	if err != nil {
		return nil, err
	}
	return commitTx{Tx: tx, onCommit: c.onCommit}, nil
}

type commitTx struct {
	driver.Tx
	onCommit func()
}

func (t commitTx) Commit() error {
	if err := t.Tx.Commit(); err != nil {
		return err
	}
	t.onCommit()
	return nil
}

// openStamped opens path (migrated) with a commitConnector.
func openStamped(ctx context.Context, path string, onCommit func()) (*sql.DB, error) {
	db := sql.OpenDB(&commitConnector{dsn: wsql.DSN(path, wsql.Options{}), onCommit: onCommit, drv: &sqlite3.SQLiteDriver{}})
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, err
	}
	return db, nil
}
