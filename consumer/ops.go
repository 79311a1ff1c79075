package consumer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

// Ready reports whether the consumer can work: it runs, its subscription
// and its publisher (for retries and poison) are connected to the broker,
// and the database takes a write (sql.ProbeWrite: the write lock is free
// within Config.ProbeWait). Serve it on /readyz with
// publisher.OpsHandler.
func (c *Consumer) Ready(ctx context.Context) error {
	if !c.mu.TryLock() {
		return errors.New("consumer is starting")
	}
	started, sub, pub := c.started, c.sub, c.pub
	c.mu.Unlock()
	select {
	case <-c.stopped:
		if err := c.Err(); err != nil {
			return fmt.Errorf("consumer stopped: %w", err)
		}
		return errors.New("consumer stopped")
	default:
	}
	if !started || sub == nil || pub == nil {
		return errors.New("consumer is not started")
	}
	var errs []error
	if !sub.IsConnected() {
		errs = append(errs, errors.New("the subscription is not connected to the broker"))
	}
	if err := pub.Ready(); err != nil {
		errs = append(errs, err)
	}
	if err := wsql.ProbeWrite(ctx, c.cfg.DB, c.cfg.ProbeWait); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// pruner deletes the consumer's processed inbox rows older than the
// retention when the consumer starts and then every PruneInterval.
type pruner struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func (c *Consumer) startPruner() *pruner {
	if c.cfg.Retention < 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &pruner{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		t := time.NewTimer(0)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			start := time.Now()
			n, err := inbox.Prune(ctx, c.cfg.DB, c.cfg.Consumer, start.Add(-c.cfg.Retention), 0, false)
			logPrune(c.log, n, err, ctx.Err() != nil, c.cfg.Retention, c.cfg.PruneInterval, time.Since(start))
			t.Reset(c.cfg.PruneInterval)
		}
	}()
	return p
}

func logPrune(log *slog.Logger, n int64, err error, stopping bool, retention, interval, took time.Duration) {
	switch {
	case err != nil && !stopping:
		log.Warn("pruning processed inbox rows failed; trying again at the next interval", "deleted", n, "error", err, "next", interval)
	case n > 0:
		log.Info("pruned processed inbox rows", "deleted", n, "retention", retention, "took", took.Round(time.Millisecond))
	}
}

// stop stops the pruner and waits for it; a nil pruner is stopped.
func (p *pruner) stop() {
	if p == nil {
		return
	}
	p.cancel()
	<-p.done
}

// QueueState is one queue as a passive declare reports it.
type QueueState struct {
	Name string `json:"name"`
	// Ready is the number of messages ready for delivery. Deliveries sent
	// to a consumer and not yet acked are not counted: AMQP does not
	// report them (the consumer's warren_consumer_in_flight metric does).
	Ready int `json:"ready"`
	// Consumers is the number of consumers (channels) reading the queue.
	Consumers int `json:"consumers"`
	// Missing: the queue does not exist.
	Missing bool `json:"missing,omitempty"`
}

// Queues are a consumer's queues as the broker reports them.
type Queues struct {
	Queue  QueueState   `json:"queue"`
	Retry  []QueueState `json:"retry"`
	Poison QueueState   `json:"poison"`
}

// InspectQueues reads the depth of consumer's queue, of its retry queues
// for retryDelays (Config.RetryDelays; nil for DefaultRetryDelays) and of
// its poison queue, with passive declares: it needs no management plugin
// and changes nothing. A queue that does not exist is reported Missing.
func InspectQueues(ctx context.Context, conn *amqp.Connection, consumer string, retryDelays []time.Duration) (Queues, error) {
	if err := publisher.ValidateName(consumer); err != nil {
		return Queues{}, err
	}
	if len(retryDelays) == 0 {
		retryDelays = DefaultRetryDelays()
	}
	var delays []time.Duration
	for _, d := range retryDelays {
		if !slices.Contains(delays, d) {
			delays = append(delays, d)
		}
	}
	names := []string{publisher.QueueName(consumer)}
	for _, d := range delays {
		names = append(names, publisher.RetryQueueName(consumer, d))
	}
	names = append(names, publisher.PoisonQueueName(consumer))
	states := make([]QueueState, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Go(func() {
			st := QueueState{Name: name}
			err := publisher.OnThrowawayChannel(ctx, conn, func(ch *amqp.Channel) error {
				q, err := ch.QueueDeclarePassive(name, true, false, false, false, nil)
				st.Ready, st.Consumers = q.Messages, q.Consumers
				return err
			})
			var amqpErr *amqp.Error
			if errors.As(err, &amqpErr) && amqpErr.Code == amqp.NotFound {
				st.Missing, err = true, nil
			}
			states[i], errs[i] = st, err
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return Queues{}, fmt.Errorf("inspect the queues of %s: %w", consumer, err)
	}
	return Queues{Queue: states[0], Retry: states[1 : len(states)-1], Poison: states[len(states)-1]}, nil
}
