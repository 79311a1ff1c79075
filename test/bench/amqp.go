package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/schollz/progressbar/v3"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
)

// onChannel runs f on a throwaway channel of the bench's connection (a
// refused declare closes the channel it was made on).
func (b *bench) onChannel(f func(*amqp.Channel) error) error {
	ch, err := b.conn.Channel()
	if err != nil {
		return err
	}
	defer ch.Close()
	return f(ch)
}

// exchange declares a durable topic exchange, as warren's publisher does,
// and deletes it at the end of the run.
func (b *bench) exchange(name string) error {
	err := b.onChannel(func(ch *amqp.Channel) error {
		return ch.ExchangeDeclare(name, "topic", true, false, false, false, nil)
	})
	if err != nil {
		return fmt.Errorf("declare exchange %s: %w", name, err)
	}
	b.defer_(func() error {
		return b.onChannel(func(ch *amqp.Channel) error { return ch.ExchangeDelete(name, false, false) })
	})
	return nil
}

// quorumQueue declares a durable quorum queue bound to exchange with "#",
// the kind of queue a warren consumer gets by default. The returned func
// deletes it (it is deleted at the end of the run too).
func (b *bench) quorumQueue(name, exchange string) (func(), error) {
	return b.boundedQueue(name, exchange, 0)
}

// boundedQueue is quorumQueue holding at most maxLen messages (0: no
// limit): beyond it the broker drops the oldest (x-overflow drop-head).
func (b *bench) boundedQueue(name, exchange string, maxLen int) (func(), error) {
	args := amqp.Table{amqp.QueueTypeArg: amqp.QueueTypeQuorum}
	if maxLen > 0 {
		args[amqp.QueueMaxLenArg] = int64(maxLen)
		args[amqp.QueueOverflowArg] = amqp.QueueOverflowDropHead
	}
	err := b.onChannel(func(ch *amqp.Channel) error {
		if _, err := ch.QueueDeclare(name, true, false, false, false, args); err != nil {
			return err
		}
		return ch.QueueBind(name, "#", exchange, false, nil)
	})
	if err != nil {
		return nil, fmt.Errorf("declare quorum queue %s: %w", name, err)
	}
	var once sync.Once
	del := func() {
		once.Do(func() { _ = b.deleteQueue(name) })
	}
	b.defer_(func() error { del(); return nil })
	return del, nil
}

func (b *bench) deleteQueue(name string) error {
	return b.onChannel(func(ch *amqp.Channel) error {
		_, err := ch.QueueDelete(name, false, false, false)
		return err
	})
}

// depth returns the number of ready messages in queue.
func (b *bench) depth(queue string) (int, error) {
	var n int
	err := b.onChannel(func(ch *amqp.Channel) error {
		q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
		n = q.Messages
		return err
	})
	return n, err
}

// waitDepth waits until queue holds at least n messages, checking every
// 50ms, and returns when it saw them.
func (b *bench) waitDepth(ctx context.Context, queue string, n int, timeout time.Duration, bar *progressbar.ProgressBar) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		d, err := b.depth(queue)
		if err != nil {
			return time.Time{}, fmt.Errorf("depth of %s: %w", queue, err)
		}
		now := time.Now()
		if bar != nil {
			_ = bar.Set(min(d, n))
		}
		if d >= n {
			return now, nil
		}
		if now.After(deadline) {
			return time.Time{}, fmt.Errorf("queue %s holds %d of %d messages after %s", queue, d, n, timeout)
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
}

// follow updates bar from counter every 100ms until the returned func is
// called.
func follow(bar *progressbar.ProgressBar, counter *atomic.Int64) func() {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				_ = bar.Set64(counter.Load())
			case <-stop:
				_ = bar.Set64(counter.Load())
				return
			}
		}
	}()
	return func() { close(stop); <-done; _ = bar.Finish() }
}

// warrenPublishings returns the AMQP publishings warren's relay sends for
// events 0..n-1 of producer: the same message the relay builds from an
// outbox row (relay/message.go), marshaled by warren's own marshaler.
func warrenPublishings(producer string, n int) ([]amqp.Publishing, error) {
	out := make([]amqp.Publishing, n)
	now := time.Now().UTC().Format(time.RFC3339Nano)
	for i := range out {
		ev := event(producer, i)
		id, err := uuid.NewV7()
		if err != nil {
			return nil, err
		}
		msg := message.NewMessage(id.String(), ev.Payload)
		md := msg.Metadata
		md.Set(publisher.MetaExchange, publisher.ExchangeName(producer))
		md.Set(publisher.MetaRoutingKey, ev.Type)
		md.Set(publisher.MetaType, ev.Type)
		md.Set(publisher.MetaAppID, producer)
		md.Set(publisher.MetaContentType, outbox.DefaultContentType)
		md.Set(publisher.MetaTimestamp, now)
		md.Set(publisher.HeaderAggregateType, ev.AggregateType)
		md.Set(publisher.HeaderAggregateID, ev.AggregateID)
		if out[i], err = (publisher.Marshaler{}).Marshal(msg); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// rawDial connects as a plain amqp091-go program does: amqp.Dial's own
// dialer and settings, none of warren's (warren's connections gather the
// writes of back-to-back publishes; the baselines must not).
func rawDial(url string) (*amqp.Connection, error) {
	conn, err := amqp.Dial(url)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", publisher.RedactURL(url), err)
	}
	return conn, nil
}

// rawPublish publishes msgs to exchange, mandatory and persistent, on one
// confirm-mode channel of a connection of its own with at most win
// publishes awaiting their confirm, and returns the time from the first
// publish to the last confirm.
func rawPublish(ctx context.Context, url, exchange string, msgs []amqp.Publishing, win int, bar *progressbar.ProgressBar) (time.Duration, error) {
	conn, err := rawDial(url)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return 0, err
	}
	defer ch.Close()
	if err := ch.Confirm(false); err != nil {
		return 0, err
	}
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, win))
	returns := ch.NotifyReturn(make(chan amqp.Return, 16))
	var returned atomic.Int64
	go func() {
		for range returns {
			returned.Add(1)
		}
	}()

	tokens := make(chan struct{}, win)
	var confirmed atomic.Int64
	var nacked int
	done := make(chan error, 1)
	go func() {
		for c := range confirms {
			if !c.Ack {
				nacked++
			}
			<-tokens
			if confirmed.Add(1) == int64(len(msgs)) {
				done <- nil
				return
			}
		}
		done <- errors.New("channel closed before every confirm arrived")
	}()
	stopBar := follow(bar, &confirmed)
	defer stopBar()
	stopSampling := sample(func() int { return len(tokens) })
	defer func() { lastRawWindow = stopSampling() }()

	start := time.Now()
	for i := range msgs {
		select {
		case tokens <- struct{}{}:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		if err := ch.PublishWithContext(ctx, exchange, eventType, true, false, msgs[i]); err != nil {
			return 0, fmt.Errorf("publish: %w", err)
		}
	}
	select {
	case err := <-done:
		if err != nil {
			return 0, err
		}
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	took := time.Since(start)
	if nacked > 0 || returned.Load() > 0 {
		return 0, fmt.Errorf("%d nacked, %d returned as unroutable", nacked, returned.Load())
	}
	return took, nil
}

// rawConsume consumes n messages from queue with manual acks on channels
// channels of one connection, each with the given prefetch, acking every
// message on its own, and returns the time from the first Consume call to
// the last ack.
func rawConsume(ctx context.Context, url, queue string, n, channels, prefetch int, bar *progressbar.ProgressBar) (time.Duration, error) {
	conn, err := rawDial(url)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	chs := make([]*amqp.Channel, channels)
	for i := range chs {
		if chs[i], err = conn.Channel(); err != nil {
			return 0, err
		}
		if err := chs[i].Qos(prefetch, 0, false); err != nil {
			return 0, err
		}
	}
	var acked atomic.Int64
	stopBar := follow(bar, &acked)
	defer stopBar()
	all := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	errs := make(chan error, channels)
	start := time.Now()
	for i, ch := range chs {
		ds, err := ch.Consume(queue, fmt.Sprintf("raw-%d", i), false, false, false, false, nil)
		if err != nil {
			return 0, fmt.Errorf("consume %s: %w", queue, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case d, ok := <-ds:
					if !ok {
						return
					}
					if err := d.Ack(false); err != nil {
						errs <- err
						return
					}
					if acked.Add(1) >= int64(n) {
						once.Do(func() { close(all) })
					}
				case <-all:
					return
				}
			}
		}()
	}
	var took time.Duration
	select {
	case <-all:
		took = time.Since(start)
	case err := <-errs:
		return 0, fmt.Errorf("ack: %w", err)
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	for i, ch := range chs {
		_ = ch.Cancel(fmt.Sprintf("raw-%d", i), false)
	}
	wg.Wait()
	return took, nil
}

// lastRawWindow is how many publishes awaited their confirm, on average,
// during the last rawPublish.
var lastRawWindow float64

// sample calls f every millisecond until the returned func is called,
// which returns the mean of the values.
func sample(f func() int) func() float64 {
	stop := make(chan struct{})
	mean := make(chan float64, 1)
	go func() {
		var sum, n int64
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				sum += int64(f())
				n++
			case <-stop:
				mean <- float64(sum) / float64(max(n, 1))
				return
			}
		}
	}()
	var once sync.Once
	var m float64
	return func() float64 {
		once.Do(func() { close(stop); m = <-mean })
		return m
	}
}
