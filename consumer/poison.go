package consumer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
)

// DefaultPoisonListLimit is how many messages ListPoison returns when limit
// is 0.
const DefaultPoisonListLimit = 100

// PoisonMessage is a message parked in a consumer's poison queue.
type PoisonMessage struct {
	// Delivery holds the message's properties, headers and body; Exchange
	// and RoutingKey are where it first came from.
	inbox.Delivery
	Reason        string    // warren-poison-reason
	Attempts      int       // warren-attempt
	LastError     string    // warren-error
	FirstFailedAt time.Time // warren-first-failed-at; zero when absent
}

// ListPoison returns up to limit messages (DefaultPoisonListLimit when 0)
// from the head of the consumer's poison queue without removing them: it
// gets them with manual acks, then nacks them back with requeue, so they
// stay in the queue in their order. While it runs they are invisible to
// other readers of the queue.
func ListPoison(ctx context.Context, conn *amqp.Connection, consumer string, limit int) ([]PoisonMessage, error) {
	if err := publisher.ValidateName(consumer); err != nil {
		return nil, err
	}
	if limit < 0 {
		return nil, fmt.Errorf("poison list: limit %d is negative", limit)
	}
	if limit == 0 {
		limit = DefaultPoisonListLimit
	}
	queue := publisher.PoisonQueueName(consumer)
	ch, err := openChannel(ctx, conn)
	if err != nil {
		return nil, err
	}
	defer ch.Close() // requeues whatever is still unacked
	if _, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil); err != nil {
		return nil, poisonQueueError(queue, err)
	}
	var out []PoisonMessage
	var last uint64
	for len(out) < limit {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		d, ok, err := ch.Get(queue, false)
		if err != nil {
			return nil, fmt.Errorf("poison list: get from %s: %w", queue, err)
		}
		if !ok {
			break
		}
		last = d.DeliveryTag
		out = append(out, poisonMessage(consumer, d))
	}
	if last > 0 {
		if err := ch.Nack(last, true, true); err != nil {
			return nil, fmt.Errorf("poison list: put the messages back in %s: %w", queue, err)
		}
	}
	return out, nil
}

func poisonMessage(consumer string, d amqp.Delivery) PoisonMessage {
	id, _ := publisher.Inspect(d)
	del := toDelivery(consumer, &d, id, time.Now())
	del.Redelivered = false
	pm := PoisonMessage{
		Delivery:      del.Delivery,
		Reason:        del.Headers[publisher.HeaderPoisonReason],
		Attempts:      del.trips,
		LastError:     del.Headers[publisher.HeaderError],
		FirstFailedAt: del.FirstFailedAt,
	}
	pm.MessageID = d.MessageId // not the sanitized id
	return pm
}

// redriveDropHeaders are removed from a message sent back to the queue:
// the failure headers (the attempt count starts again) and the broker's.
func redriveDropHeader(k string) bool {
	switch k {
	case publisher.HeaderAttempt, publisher.HeaderError, publisher.HeaderFirstFailedAt,
		publisher.HeaderPoisonReason, publisher.HeaderDeath, publisher.HeaderDeliveryCount:
		return true
	}
	return strings.HasPrefix(k, "x-first-death-") || strings.HasPrefix(k, "x-last-death-")
}

// Redrive moves messages from the consumer's poison queue back to its
// queue "<consumer>", with the attempt count reset: the failure headers
// (warren-attempt, warren-error, warren-first-failed-at,
// warren-poison-reason) and the broker's (x-death, ...) are removed; the
// properties, the body and every other header stay, warren-original-exchange
// and warren-original-routing-key included, so the handler sees where the
// message first came from.
//
// With ids, only the messages with those message ids move (the others stay
// in the poison queue, in their order); otherwise up to limit messages
// from the head of the queue (all of them when limit is 0). Each message is
// published with a confirm before its poison copy is acked, so a crash
// midway loses nothing (it may leave a message in both queues: the inbox
// deduplicates it). progress, if not nil, is called after each message
// with the count moved and the count planned. It returns how many moved.
func Redrive(ctx context.Context, conn *amqp.Connection, consumer string, limit int, ids []string, progress func(done, total int)) (int, error) {
	if err := publisher.ValidateName(consumer); err != nil {
		return 0, err
	}
	if limit < 0 {
		return 0, fmt.Errorf("poison redrive: limit %d is negative", limit)
	}
	queue, target := publisher.PoisonQueueName(consumer), publisher.QueueName(consumer)
	get, err := openChannel(ctx, conn)
	if err != nil {
		return 0, err
	}
	defer get.Close() // requeues the messages skipped
	q, err := get.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		return 0, poisonQueueError(queue, err)
	}
	pub, err := openChannel(ctx, conn)
	if err != nil {
		return 0, err
	}
	defer pub.Close()
	if err := pub.Confirm(false); err != nil {
		return 0, fmt.Errorf("poison redrive: confirm mode: %w", err)
	}
	returns := pub.NotifyReturn(make(chan amqp.Return, 1))

	wanted := map[string]bool{}
	for _, id := range ids {
		wanted[id] = true
	}
	total := q.Messages
	switch {
	case len(wanted) > 0:
		total = len(wanted)
	case limit > 0:
		total = min(total, limit)
	}
	done := 0
	for done < total {
		if err := ctx.Err(); err != nil {
			return done, err
		}
		d, ok, err := get.Get(queue, false)
		if err != nil {
			return done, fmt.Errorf("poison redrive: get from %s: %w", queue, err)
		}
		if !ok {
			break
		}
		if len(wanted) > 0 && !wanted[d.MessageId] {
			continue // stays unacked until the channel closes: back in the queue
		}
		delete(wanted, d.MessageId)
		if err := republish(ctx, pub, returns, target, d); err != nil {
			return done, fmt.Errorf("poison redrive: message %s: %w", d.MessageId, err)
		}
		if err := d.Ack(false); err != nil {
			return done, fmt.Errorf("poison redrive: message %s is back in %s but still in %s: %w", d.MessageId, target, queue, err)
		}
		done++
		if progress != nil {
			progress(done, total)
		}
	}
	return done, nil
}

// republish publishes d to queue through the default exchange, mandatory,
// and waits for the broker's confirm.
func republish(ctx context.Context, ch *amqp.Channel, returns <-chan amqp.Return, queue string, d amqp.Delivery) error {
	headers := amqp.Table{}
	for k, v := range d.Headers {
		if !redriveDropHeader(k) {
			headers[k] = v
		}
	}
	p := amqp.Publishing{
		Headers:         headers,
		ContentType:     d.ContentType,
		ContentEncoding: d.ContentEncoding,
		DeliveryMode:    amqp.Persistent,
		Priority:        d.Priority,
		CorrelationId:   d.CorrelationId,
		ReplyTo:         d.ReplyTo,
		Expiration:      d.Expiration,
		MessageId:       d.MessageId,
		Timestamp:       d.Timestamp,
		Type:            d.Type,
		UserId:          d.UserId,
		AppId:           d.AppId,
		Body:            d.Body,
	}
	conf, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, true, false, p)
	if err != nil {
		return fmt.Errorf("publish to %s: %w", queue, err)
	}
	acked, err := conf.WaitContext(ctx)
	if err != nil {
		return fmt.Errorf("wait for the confirm of %s: %w", queue, err)
	}
	if !acked {
		return fmt.Errorf("the broker refused it (nack) in %s", queue)
	}
	// A return comes before its ack: if there is one, it is this message.
	select {
	case r := <-returns:
		return fmt.Errorf("queue %s does not exist (%s): run `warren topology declare`", queue, r.ReplyText)
	default:
	}
	return nil
}

// Purge drops every message of the consumer's poison queue and returns how
// many there were.
func Purge(ctx context.Context, conn *amqp.Connection, consumer string) (int, error) {
	if err := publisher.ValidateName(consumer); err != nil {
		return 0, err
	}
	queue := publisher.PoisonQueueName(consumer)
	var n int
	err := publisher.OnThrowawayChannel(ctx, conn, func(ch *amqp.Channel) error {
		var err error
		n, err = ch.QueuePurge(queue, false)
		return err
	})
	if err != nil {
		return 0, poisonQueueError(queue, err)
	}
	return n, nil
}

func openChannel(ctx context.Context, conn *amqp.Connection) (*amqp.Channel, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if conn == nil || conn.IsClosed() {
		return nil, fmt.Errorf("%w: the connection is closed", publisher.ErrConnectionLost)
	}
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("open channel: %w", err)
	}
	return ch, nil
}

func poisonQueueError(queue string, err error) error {
	var amqpErr *amqp.Error
	if errors.As(err, &amqpErr) && amqpErr.Code == amqp.NotFound {
		return fmt.Errorf("poison queue %s does not exist: run `warren topology declare` (or start the consumer once): %w", queue, ErrTopologyMissing)
	}
	return fmt.Errorf("poison queue %s: %w", queue, err)
}
