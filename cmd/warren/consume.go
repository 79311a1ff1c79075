package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
)

func newConsumeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "consume --app NAME --from PRODUCER[:KEY,...] [--sink inbox|URL]",
		Short: "Consume an application's queue into the inbox, or into an HTTP endpoint",
		Long: `consume reads the queue <app>, bound to <producer>.events for each --from
(keys default to #), and records every delivery in warren_inbox. A delivery
whose message id is already processed is acked without running the sink
again.

Sinks:
  inbox         record only, for audit (default)
  http(s)://…   POST each delivery as the contract's JSON; a 2xx answer is
                success, anything else or a timeout is a failure

A failure is retried at once, then through <app>.retry.<delay> queues
(--retry-delays), and after --max-attempts parked in <app>.poison with the
reason (see warren poison).

Processed inbox rows older than --inbox-retention (default 30d) are deleted
in short batches when the consumer starts and then hourly; retrying and
poisoned rows are kept.

With --metrics-addr (e.g. :9465) it serves Prometheus metrics on /metrics
(warren_consumer_deliveries_total, _duplicates_total, _retries_total,
_poisoned_total, _handler_seconds, _in_flight and Watermill's router
metrics), /healthz and /readyz (503 while the broker is unreachable or the
database cannot be written).

A delivery whose traceparent header carries a W3C trace context is handled
in a span that continues it; the HTTP sink sends the traceparent on.

  warren consume --db billing.db --app billing --from crm:company.* --from shop
  warren consume --app audit --from crm --sink https://audit.internal/events`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			log := newLogger(cfg, cmd.ErrOrStderr())
			ctx, stop := signalContext(cmd.Context(), log)
			defer stop()
			return runConsume(ctx, cfg, log)
		},
	}
	addFlags(cmd, "db", "url", "declare", "app", "from", "sink", "concurrency", "prefetch", "handler-timeout",
		"max-attempts", "retry-delays", "auto-ack", "binary", "expiration", "queue-type", "inbox-retention", "metrics-addr", "log-format", "log-level")
	return cmd
}

// parseFrom turns "producer[:key,key]" values into subscriptions.
func parseFrom(values []string) ([]consumer.Subscription, error) {
	var subs []consumer.Subscription
	for _, v := range values {
		producer, keys, _ := strings.Cut(v, ":")
		if err := publisher.ValidateName(producer); err != nil {
			return nil, fmt.Errorf("--from %q: %w", v, err)
		}
		s := consumer.Subscription{Producer: producer}
		for _, k := range strings.Split(keys, ",") {
			if k = strings.TrimSpace(k); k != "" {
				s.Keys = append(s.Keys, k)
			}
		}
		subs = append(subs, s)
	}
	return subs, nil
}

// consumerConfig maps the command's settings to the consumer's.
func consumerConfig(cfg Config, log *slog.Logger) (consumer.Config, error) {
	if cfg.App == "" {
		return consumer.Config{}, fmt.Errorf("no consuming application: give --app NAME (or WARREN_APP, consumer.app)")
	}
	if len(cfg.From) == 0 {
		return consumer.Config{}, fmt.Errorf("no subscription: give --from PRODUCER[:KEY,...] at least once (or consumer.from)")
	}
	subs, err := parseFrom(cfg.From)
	if err != nil {
		return consumer.Config{}, err
	}
	host, _ := os.Hostname()
	return consumer.Config{
		Consumer:       cfg.App,
		From:           subs,
		Connection:     connectionConfig(cfg, "warren consume "+cfg.App+" "+host),
		QueueType:      consumer.QueueType(cfg.QueueType),
		Concurrency:    cfg.Concurrency,
		Prefetch:       cfg.Prefetch,
		HandlerTimeout: cfg.HandlerTimeout,
		MaxAttempts:    cfg.MaxAttempts,
		RetryDelays:    cfg.RetryDelays,
		AutoAck:        cfg.AutoAck,
		Binary:         cfg.Binary,
		Expiration:     cfg.Expiration,
		MaxBodyBytes:   cfg.MaxPayloadBytes,
		NoDeclare:      !cfg.Declare,
		Logger:         log,
		Retention:      retentionOf(cfg.InboxRetention),
	}, nil
}

func sinkHandler(cfg Config) consumer.Handler {
	if cfg.Sink == "" || cfg.Sink == "inbox" {
		return consumer.Inbox
	}
	return consumer.HTTPSink(cfg.Sink, nil, cfg.Binary)
}

func runConsume(ctx context.Context, cfg Config, log *slog.Logger) error {
	consumer.TuneProcess()
	ccfg, err := consumerConfig(cfg, log)
	if err != nil {
		return err
	}
	db, err := openDB(ctx, cfg)
	if err != nil {
		return err
	}
	defer db.Close()
	ccfg.DB = db.DB
	ln, err := listenOps(cfg.MetricsAddr)
	if err != nil {
		return err
	}
	if ln != nil {
		defer ln.Close()
	}
	reg := newRegistry()
	if cfg.MetricsAddr != "" {
		if ccfg.Metrics, err = consumer.NewMetrics(reg); err != nil {
			return err
		}
	}
	c, err := consumer.New(ccfg, sinkHandler(cfg))
	if err != nil {
		return err
	}
	defer serveOps(ln, log, reg, publisher.Check{Name: "consumer", Run: c.Ready})()
	if err := c.Run(ctx); err != nil {
		return fmt.Errorf("consume %s: %w", cfg.App, err)
	}
	return nil
}

// consumerTopologyCmd declares or verifies the consumer's queues for
// `warren topology`.
func consumerTopologyCmd(cmd *cobra.Command, cfg Config, conn *amqp.Connection, verify bool) error {
	ccfg, err := consumerConfig(cfg, nil)
	if err != nil {
		return err
	}
	if verify {
		err = consumer.VerifyTopology(cmd.Context(), conn, ccfg)
	} else {
		err = consumer.DeclareTopology(cmd.Context(), conn, ccfg)
	}
	if err != nil {
		return err
	}
	word := map[bool]string{false: "declared", true: "ok"}[verify]
	fmt.Fprintf(cmd.OutOrStdout(), "queue %s with its bindings, retry queues and %s: %s\n", cfg.App, publisher.PoisonQueueName(cfg.App), word)
	return nil
}
