package relay

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/warrenmq/warren/outbox"
)

// prune deletes the published rows older than the retention at once and
// then every PruneInterval, until ctx is done.
func (r *Relay) prune(ctx context.Context, log *slog.Logger) {
	if r.cfg.Retention < 0 {
		return
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		n, err := outbox.Prune(ctx, r.cfg.DB, start.Add(-r.cfg.Retention), 0, false)
		switch {
		case err != nil && ctx.Err() == nil:
			log.Warn("pruning published outbox rows failed; trying again at the next interval", "deleted", n, "error", err, "next", r.cfg.PruneInterval)
		case n > 0:
			log.Info("pruned published outbox rows", "deleted", n, "retention", r.cfg.Retention, "took", time.Since(start).Round(time.Millisecond))
		}
		if err != nil && errors.Is(err, context.Canceled) {
			return
		}
		t.Reset(r.cfg.PruneInterval)
	}
}
