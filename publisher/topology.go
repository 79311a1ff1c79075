package publisher

import (
	"context"
	"errors"
	"fmt"
	"strings"

	amqp "github.com/rabbitmq/amqp091-go"
)

// ExchangeKind is the kind of every producer exchange, per the contract.
const ExchangeKind = amqp.ExchangeTopic

// ErrExchangeMissing is wrapped by the errors of VerifyExchange and of a
// publish with Config.NoDeclare when the exchange does not exist.
var ErrExchangeMissing = errors.New("exchange does not exist")

// ErrExchangeMismatch is wrapped when an exchange exists with another kind
// or other attributes than the contract's durable topic exchange.
var ErrExchangeMismatch = errors.New("exchange exists with other attributes")

// DeclareExchange declares the producer's exchange "<producer>.events": a
// durable topic exchange. It is idempotent; it fails, wrapping
// ErrExchangeMismatch, when the exchange exists with another kind or other
// attributes. It uses a channel of its own, so a refusal never disturbs
// other channels of conn.
func DeclareExchange(ctx context.Context, conn *amqp.Connection, producer string) error {
	if err := ValidateName(producer); err != nil {
		return err
	}
	return declareExchange(ctx, conn, ExchangeName(producer))
}

// VerifyExchange checks, without creating anything, that the producer's
// exchange "<producer>.events" exists as a durable topic exchange. The error
// wraps ErrExchangeMissing when it does not exist, ErrExchangeMismatch when
// it exists with another kind. Where the user has no configure permission
// on the exchange only its existence can be checked.
func VerifyExchange(ctx context.Context, conn *amqp.Connection, producer string) error {
	if err := ValidateName(producer); err != nil {
		return err
	}
	name := ExchangeName(producer)
	if err := verifyExchangeExists(ctx, conn, name); err != nil {
		return err
	}
	// A passive declare ignores the kind. Redeclaring with the same
	// attributes is a no-op on an existing exchange and fails with 406 when
	// they differ, which is how the kind is checked.
	err := declareExchange(ctx, conn, name)
	var amqpErr *amqp.Error
	if errors.As(err, &amqpErr) && amqpErr.Code == amqp.AccessRefused {
		return nil // exists; the kind cannot be checked without configure permission
	}
	return err
}

// declareExchange declares name as a durable topic exchange on a throwaway
// channel.
func declareExchange(ctx context.Context, conn *amqp.Connection, name string) error {
	return OnThrowawayChannel(ctx, conn, func(ch *amqp.Channel) error {
		err := ch.ExchangeDeclare(name, ExchangeKind, true, false, false, false, nil)
		if err == nil {
			return nil
		}
		var amqpErr *amqp.Error
		if errors.As(err, &amqpErr) && amqpErr.Code == amqp.PreconditionFailed {
			return fmt.Errorf("exchange %q exists with another kind or other attributes than a durable %s exchange (%s): delete it or fix it: %w",
				name, ExchangeKind, amqpErr.Reason, ErrExchangeMismatch)
		}
		return fmt.Errorf("declare exchange %q: %w", name, err)
	})
}

// verifyExchangeExists runs a passive declare of name on a throwaway
// channel (a missing exchange closes the channel it was asked on).
func verifyExchangeExists(ctx context.Context, conn *amqp.Connection, name string) error {
	return OnThrowawayChannel(ctx, conn, func(ch *amqp.Channel) error {
		err := ch.ExchangeDeclarePassive(name, ExchangeKind, true, false, false, false, nil)
		if err == nil {
			return nil
		}
		var amqpErr *amqp.Error
		if errors.As(err, &amqpErr) && amqpErr.Code == amqp.NotFound {
			return &ExchangeMissingError{Exchange: name}
		}
		return fmt.Errorf("check exchange %q: %w", name, err)
	})
}

// ExchangeMissingError reports an exchange that does not exist; it wraps
// ErrExchangeMissing.
type ExchangeMissingError struct {
	Exchange string
}

// Error names the exchange and says how to create it.
func (e *ExchangeMissingError) Error() string {
	hint := "create it"
	if producer, ok := strings.CutSuffix(e.Exchange, ".events"); ok && ValidateName(producer) == nil {
		hint = "run `warren topology declare` or create it as a durable topic exchange"
	}
	return fmt.Sprintf("exchange %q does not exist: %s", e.Exchange, hint)
}

// Unwrap returns ErrExchangeMissing.
func (e *ExchangeMissingError) Unwrap() error { return ErrExchangeMissing }

// OnThrowawayChannel opens a channel, runs f on it and closes it: the way
// to make a declaration that the broker may refuse (a refusal closes the
// channel it was made on). It gives up when ctx ends (the channel is then
// closed by the goroutine when f returns, which happens at the latest when
// the connection dies).
func OnThrowawayChannel(ctx context.Context, conn *amqp.Connection, f func(*amqp.Channel) error) error {
	if conn == nil || conn.IsClosed() {
		return fmt.Errorf("%w: the connection is closed", ErrConnectionLost)
	}
	done := make(chan error, 1)
	go func() {
		ch, err := conn.Channel()
		if err != nil {
			done <- fmt.Errorf("open channel: %w", err)
			return
		}
		err = f(ch)
		if !ch.IsClosed() {
			_ = ch.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
