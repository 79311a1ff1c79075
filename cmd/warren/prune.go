package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
)

// pruneResult is what prune prints with --format json.
type pruneResult struct {
	Table     string    `json:"table"`
	Consumer  string    `json:"consumer,omitempty"`
	Retention string    `json:"retention"`
	Before    time.Time `json:"before"`
	DryRun    bool      `json:"dry_run"`
	Rows      int64     `json:"rows"`
}

func printPrune(cmd *cobra.Command, format string, r pruneResult, what string) error {
	if format == "json" {
		return writeJSON(cmd.OutOrStdout(), r)
	}
	verb := "deleted"
	if r.DryRun {
		verb = "would delete"
	}
	fmt.Fprintf(cmd.OutOrStdout(), "%s %d %s older than %s (before %s)\n", verb, r.Rows, what, r.Retention, r.Before.Format(time.RFC3339))
	return nil
}

func newOutboxPruneCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Delete published events older than the retention (the relay does it hourly)",
		Long: `prune deletes the published rows of warren_outbox older than
--outbox-retention (default 7d), in short batches that leave the write lock
free in between, so the application's writes are not held up. Unpublished
rows are never deleted. --dry-run only counts.

  warren outbox prune --db app.db --dry-run
  warren outbox prune --db app.db --outbox-retention 2d`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, format, err := loadConfigAndFormat(cmd)
			if err != nil {
				return err
			}
			if cfg.OutboxRetention == 0 {
				return errors.New("the outbox retention (--outbox-retention, outbox_retention) is 0, which keeps published rows forever: give one, e.g. 7d")
			}
			dry, _ := cmd.Flags().GetBool("dry-run")
			db, err := openDB(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			defer db.Close()
			before := time.Now().Add(-cfg.OutboxRetention)
			n, err := outbox.Prune(cmd.Context(), db.DB, before, 0, dry)
			if err != nil {
				return err
			}
			return printPrune(cmd, format, pruneResult{Table: "warren_outbox", Retention: formatRetention(cfg.OutboxRetention),
				Before: before.UTC(), DryRun: dry, Rows: n}, "published outbox rows")
		},
	}
	addFlags(cmd, "db", "outbox-retention")
	addFormatFlag(cmd)
	cmd.Flags().Bool("dry-run", false, "only count the rows that would be deleted")
	return cmd
}

func newInboxPruneCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Delete processed deliveries older than the retention (the consumer does it hourly)",
		Long: `prune deletes the processed rows of warren_inbox older than
--inbox-retention (default 30d), of one consumer with --app or of all, in
short batches that leave the write lock free in between, so the
application's writes are not held up. Retrying and poisoned rows are kept.
--dry-run only counts.

A message id whose row was pruned is no longer deduplicated: keep rows for
longer than any redelivery can take.

  warren inbox prune --db billing.db --app billing --dry-run`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, format, err := loadConfigAndFormat(cmd)
			if err != nil {
				return err
			}
			if cfg.App != "" {
				if err := publisher.ValidateName(cfg.App); err != nil {
					return fmt.Errorf("--app: %w", err)
				}
			}
			if cfg.InboxRetention == 0 {
				return errors.New("the inbox retention (--inbox-retention, inbox_retention) is 0, which keeps processed rows forever: give one, e.g. 30d")
			}
			dry, _ := cmd.Flags().GetBool("dry-run")
			db, err := openDB(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			defer db.Close()
			before := time.Now().Add(-cfg.InboxRetention)
			n, err := inbox.Prune(cmd.Context(), db.DB, cfg.App, before, 0, dry)
			if err != nil {
				return err
			}
			what := "processed inbox rows"
			if cfg.App != "" {
				what += " of " + cfg.App
			}
			return printPrune(cmd, format, pruneResult{Table: "warren_inbox", Consumer: cfg.App, Retention: formatRetention(cfg.InboxRetention),
				Before: before.UTC(), DryRun: dry, Rows: n}, what)
		},
	}
	addFlags(cmd, "db", "app", "inbox-retention")
	addFormatFlag(cmd)
	cmd.Flags().Bool("dry-run", false, "only count the rows that would be deleted")
	return cmd
}
