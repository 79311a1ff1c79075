package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/relay"
)

func newRelayCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "relay",
		Short: "Publish the outbox to RabbitMQ until stopped",
		Long: `relay publishes every committed row of warren_outbox to its producer's
exchange "<producer>.events" with publisher confirms, and marks a row
published only after the broker confirmed it. Events of one aggregate are
published in order. It wakes within milliseconds of a commit.

One relay publishes from a database at a time; a second one on the same file
waits as a standby and takes over when the first one's process ends.

SIGINT or SIGTERM stops reading, waits for outstanding confirms, marks them
and exits 0; a second signal exits at once (unconfirmed rows are published
again by the next run).

Published rows older than --outbox-retention (default 7d) are deleted in
short batches when the relay starts publishing and then hourly.

With --metrics-addr (e.g. :9464) it serves Prometheus metrics on /metrics
(warren_outbox_backlog, warren_outbox_oldest_unpublished_seconds,
warren_relay_published_total, warren_relay_unroutable_total,
warren_relay_confirm_seconds and Watermill's router metrics), /healthz and
/readyz (503 while the broker is unreachable or the database cannot be
written).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			log := newLogger(cfg, cmd.ErrOrStderr())
			ctx, stop := signalContext(cmd.Context(), log)
			defer stop()
			return runRelay(ctx, cfg, log)
		},
	}
	addFlags(cmd, "db", "url", "declare", "window", "unroutable", "max-payload-bytes", "outbox-retention", "metrics-addr", "log-format", "log-level")
	return cmd
}

func runRelay(ctx context.Context, cfg Config, log *slog.Logger) error {
	relay.TuneProcess()
	db, err := openDB(ctx, cfg)
	if err != nil {
		return err
	}
	defer db.Close()
	ln, err := listenOps(cfg.MetricsAddr)
	if err != nil {
		return err
	}
	if ln != nil {
		defer ln.Close()
	}
	host, _ := os.Hostname()
	pcfg := publisher.Config{
		Connection: connectionConfig(cfg, "warren relay "+host),
		Window:     cfg.RelayWindow,
		NoDeclare:  !cfg.Declare,
		Logger:     log,
	}
	if cfg.RelayUnroutable == "keep" {
		pcfg.Unroutable = publisher.UnroutableKeep
	}
	var metrics *relay.Metrics
	reg := newRegistry()
	if cfg.MetricsAddr != "" {
		if metrics, err = relay.NewMetrics(reg, db.DB); err != nil {
			return err
		}
		pcfg = metrics.PublisherConfig(pcfg)
	}
	pub, err := publisher.New(pcfg)
	if err != nil {
		return err
	}
	defer pub.Close()
	if err := pub.Connect(ctx); err != nil {
		return err
	}
	r, err := relay.New(relay.Config{
		DB:              db.DB,
		DBPath:          cfg.Database,
		Publisher:       pub,
		Window:          cfg.RelayWindow,
		MaxPayloadBytes: cfg.MaxPayloadBytes,
		Logger:          log,
		Metrics:         metrics,
		Retention:       retentionOf(cfg.OutboxRetention),
	})
	if err != nil {
		return err
	}
	defer serveOps(ln, log, reg, publisher.Check{Name: "relay", Run: r.Ready})()
	if err := r.Run(ctx); err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	return nil
}
