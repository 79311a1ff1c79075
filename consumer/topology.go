package consumer

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/warrenmq/warren/publisher"
)

// ErrTopologyMissing is wrapped by VerifyTopology's errors for a queue that
// does not exist.
var ErrTopologyMissing = errors.New("topology is missing")

// ErrTopologyMismatch is wrapped when a queue exists with other arguments
// (another queue type, another TTL) than the consumer's configuration.
var ErrTopologyMismatch = errors.New("queue exists with other arguments")

// queueSpec is one queue of a consumer's topology.
type queueSpec struct {
	name string
	args amqp.Table
}

// queues returns the consumer's queues: its own, one retry queue per
// distinct delay and the poison queue.
func (c Config) queues() []queueSpec {
	typ := amqp.Table{amqp.QueueTypeArg: string(c.QueueType)}
	specs := []queueSpec{{name: publisher.QueueName(c.Consumer), args: typ}}
	var delays []time.Duration
	for _, d := range c.RetryDelays {
		if !slices.Contains(delays, d) {
			delays = append(delays, d)
		}
	}
	for _, d := range delays {
		args := amqp.Table{
			amqp.QueueTypeArg:           string(c.QueueType),
			amqp.QueueMessageTTLArg:     d.Milliseconds(),
			"x-dead-letter-exchange":    "",
			"x-dead-letter-routing-key": publisher.QueueName(c.Consumer),
		}
		if c.QueueType == Quorum {
			// Dead-letter with publisher confirms inside the broker, so a
			// retry is never lost between the retry queue and the queue.
			args["x-dead-letter-strategy"] = "at-least-once"
			args[amqp.QueueOverflowArg] = amqp.QueueOverflowRejectPublish
		}
		specs = append(specs, queueSpec{name: publisher.RetryQueueName(c.Consumer, d), args: args})
	}
	return append(specs, queueSpec{name: publisher.PoisonQueueName(c.Consumer), args: typ})
}

// DeclareTopology declares the consumer's topology per the contract:
// each subscribed producer's exchange "<producer>.events" (durable topic),
// the durable queue "<consumer>" bound to each of them with each key, the
// retry queues "<consumer>.retry.<delay>" (message TTL = delay,
// dead-lettering to the default exchange with routing key "<consumer>")
// and the poison queue "<consumer>.poison". It is idempotent. It fails,
// wrapping ErrTopologyMismatch, when a queue exists with other arguments
// (for instance a classic queue where a quorum queue is configured).
// Bindings of keys no longer configured are left in place.
func DeclareTopology(ctx context.Context, conn *amqp.Connection, cfg Config) error {
	cfg = cfg.WithDefaults()
	if err := validateTopology(cfg); err != nil {
		return err
	}
	for _, s := range cfg.From {
		if err := publisher.DeclareExchange(ctx, conn, s.Producer); err != nil {
			return fmt.Errorf("consumer %s: %w", cfg.Consumer, err)
		}
	}
	for _, q := range cfg.queues() {
		if err := declareQueue(ctx, conn, q); err != nil {
			return err
		}
	}
	queue := publisher.QueueName(cfg.Consumer)
	for _, s := range cfg.From {
		for _, k := range s.Keys {
			err := publisher.OnThrowawayChannel(ctx, conn, func(ch *amqp.Channel) error {
				return ch.QueueBind(queue, k, publisher.ExchangeName(s.Producer), false, nil)
			})
			if err != nil {
				return fmt.Errorf("bind queue %q to exchange %q with key %q: %w", queue, publisher.ExchangeName(s.Producer), k, err)
			}
		}
	}
	return nil
}

// VerifyTopology checks, without creating anything, that the consumer's
// exchanges and queues exist with the configured arguments. The error
// joins one error per problem, each naming what is missing or different
// and `warren topology declare`; missing queues wrap ErrTopologyMissing,
// missing exchanges publisher.ErrExchangeMissing. AMQP cannot list
// bindings, so they are not checked. Where the user has no configure
// permission only the existence of a queue is checked.
func VerifyTopology(ctx context.Context, conn *amqp.Connection, cfg Config) error {
	cfg = cfg.WithDefaults()
	if err := validateTopology(cfg); err != nil {
		return err
	}
	var errs []error
	for _, s := range cfg.From {
		if err := publisher.VerifyExchange(ctx, conn, s.Producer); err != nil {
			errs = append(errs, fmt.Errorf("consumer %s: %w", cfg.Consumer, err))
		}
	}
	for _, q := range cfg.queues() {
		err := publisher.OnThrowawayChannel(ctx, conn, func(ch *amqp.Channel) error {
			_, err := ch.QueueDeclarePassive(q.name, true, false, false, false, nil)
			return err
		})
		var amqpErr *amqp.Error
		switch {
		case errors.As(err, &amqpErr) && amqpErr.Code == amqp.NotFound:
			errs = append(errs, fmt.Errorf("queue %q does not exist: run `warren topology declare` (or declare it as in the contract): %w", q.name, ErrTopologyMissing))
			continue
		case err != nil:
			errs = append(errs, fmt.Errorf("check queue %q: %w", q.name, err))
			continue
		}
		// It exists: redeclaring it with the same arguments is a no-op,
		// and fails with 406 when they differ.
		err = declareQueue(ctx, conn, q)
		if errors.As(err, &amqpErr) && amqpErr.Code == amqp.AccessRefused {
			continue // exists; its arguments cannot be checked without configure permission
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func validateTopology(cfg Config) error {
	if err := publisher.ValidateName(cfg.Consumer); err != nil {
		return fmt.Errorf("consumer app: %w", err)
	}
	if len(cfg.From) == 0 {
		return errors.New("consumer subscriptions (consumer.from, --from) are empty: name at least one producer to read from")
	}
	return nil
}

func declareQueue(ctx context.Context, conn *amqp.Connection, q queueSpec) error {
	err := publisher.OnThrowawayChannel(ctx, conn, func(ch *amqp.Channel) error {
		_, err := ch.QueueDeclare(q.name, true, false, false, false, q.args)
		return err
	})
	var amqpErr *amqp.Error
	if errors.As(err, &amqpErr) && amqpErr.Code == amqp.PreconditionFailed {
		return fmt.Errorf("queue %q exists with other arguments than %v (%s): delete it (after draining it) or change the configuration (queue_type, retry_delays) to match: %w",
			q.name, q.args, amqpErr.Reason, ErrTopologyMismatch)
	}
	if err != nil {
		return fmt.Errorf("declare queue %q: %w", q.name, err)
	}
	return nil
}

// TopologyBuilder is watermill-amqp's TopologyBuilder for a consumer: when
// the subscriber (re)connects it declares the consumer's topology with
// DeclareTopology, or only checks it with VerifyTopology when
// Config.NoDeclare is set. It ignores the queue and exchange names
// watermill-amqp derives from the topic: the contract's names come from the
// Config. It declares once per connection, however many subscriptions the
// connection carries.
type TopologyBuilder struct {
	cfg  Config
	conn func() *amqp.Connection

	mu   sync.Mutex
	done *amqp.Connection // the connection the topology was last built on
}

var _ wamqp.TopologyBuilder = (*TopologyBuilder)(nil)

// NewTopologyBuilder returns the builder for cfg. conn returns the
// subscriber's current connection (watermill-amqp's
// ConnectionWrapper.Connection); it runs the declarations on channels of
// their own so that a refusal names every problem.
func NewTopologyBuilder(cfg Config, conn func() *amqp.Connection) *TopologyBuilder {
	return &TopologyBuilder{cfg: cfg.WithDefaults(), conn: conn}
}

// topologyTimeout bounds the declarations made on a (re)connection, and
// the subscription's connect before them.
const topologyTimeout = 30 * time.Second

// BuildTopology declares (or verifies) the consumer's topology on the
// builder's connection, once per connection.
func (b *TopologyBuilder) BuildTopology(_ *amqp.Channel, _ string, _ string, _ wamqp.Config, _ watermill.LoggerAdapter) error {
	ctx, cancel := context.WithTimeout(context.Background(), topologyTimeout)
	defer cancel()
	return b.build(ctx)
}

func (b *TopologyBuilder) build(ctx context.Context) error {
	var conn *amqp.Connection
	if b.conn != nil {
		conn = b.conn()
	}
	return b.buildOn(ctx, conn)
}

// buildOn declares (or verifies) the consumer's topology on conn, once per
// connection (again when the queue was deleted).
func (b *TopologyBuilder) buildOn(ctx context.Context, conn *amqp.Connection) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if conn == nil {
		return fmt.Errorf("%w: no connection", publisher.ErrConnectionLost)
	}
	if b.done == conn && !conn.IsClosed() && queueExists(conn, publisher.QueueName(b.cfg.Consumer)) {
		// Built on this connection, and the queue is still there: a
		// subscription resubscribing after its channel closed. (When the
		// queue was deleted under the consumer, it is declared again.)
		return nil
	}
	var err error
	if b.cfg.NoDeclare {
		err = VerifyTopology(ctx, conn, b.cfg)
	} else {
		err = DeclareTopology(ctx, conn, b.cfg)
	}
	if err != nil {
		return err
	}
	b.done = conn
	return nil
}

// ExchangeDeclare declares exchangeName as a durable topic exchange on
// channel (watermill-amqp's publisher path; the consumer declares through
// BuildTopology).
func (b *TopologyBuilder) ExchangeDeclare(channel *amqp.Channel, exchangeName string, _ wamqp.Config) error {
	return channel.ExchangeDeclare(exchangeName, publisher.ExchangeKind, true, false, false, false, nil)
}

// queueExists checks with a passive declare on a channel of its own (a
// failed passive declare closes the channel).
func queueExists(conn *amqp.Connection, queue string) bool {
	ch, err := conn.Channel()
	if err != nil {
		return false
	}
	defer ch.Close()
	_, err = ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	return err == nil
}
