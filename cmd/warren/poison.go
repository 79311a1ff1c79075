package main

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
)

func newPoisonCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "poison",
		Short: "Inspect, redrive or purge a consumer's poison queue",
		Long: `poison works on <app>.poison, where a consumer parks deliveries that failed
every attempt, were malformed, too large or expired.

  warren poison list --app billing
  warren poison redrive --app billing                 # all, back to the queue billing
  warren poison redrive --app billing --limit 10
  warren poison redrive --app billing --id 0190c6f4-…  # by message id (repeatable)
  warren poison purge --app billing --yes`,
	}
	cmd.AddCommand(newPoisonListCmd(), newPoisonRedriveCmd(), newPoisonPurgeCmd())
	return cmd
}

func requireApp(cfg Config) error {
	if cfg.App == "" {
		return fmt.Errorf("no consuming application: give --app NAME (or WARREN_APP)")
	}
	return publisher.ValidateName(cfg.App)
}

func newPoisonListCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List parked messages with their reason, attempts and last error (they stay parked)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, format, err := loadConfigAndFormat(cmd)
			if err != nil {
				return err
			}
			if err := requireApp(cfg); err != nil {
				return err
			}
			limit, _ := cmd.Flags().GetInt("limit")
			if limit < 1 {
				return fmt.Errorf("flag --limit: must be at least 1")
			}
			conn, err := publisher.Dial(cmd.Context(), connectionConfig(cfg, "warren poison list"))
			if err != nil {
				return err
			}
			defer conn.Close()
			msgs, err := consumer.ListPoison(cmd.Context(), conn, cfg.App, limit)
			if err != nil {
				return err
			}
			if format == "json" {
				type item struct {
					Reason        string             `json:"reason"`
					Attempts      int                `json:"attempts"`
					LastError     string             `json:"last_error,omitempty"`
					FirstFailedAt *time.Time         `json:"first_failed_at,omitempty"`
					Delivery      inbox.DeliveryJSON `json:"delivery"`
				}
				out := []item{}
				for _, m := range msgs {
					it := item{Reason: m.Reason, Attempts: m.Attempts, LastError: m.LastError, Delivery: inbox.JSON(&m.Delivery, cfg.Binary)}
					if !m.FirstFailedAt.IsZero() {
						t := m.FirstFailedAt
						it.FirstFailedAt = &t
					}
					out = append(out, it)
				}
				return writeJSON(cmd.OutOrStdout(), out)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MESSAGE ID\tFROM\tTYPE\tREASON\tATTEMPTS\tFIRST FAILED\tLAST ERROR")
			for _, m := range msgs {
				ff := "-"
				if !m.FirstFailedAt.IsZero() {
					ff = m.FirstFailedAt.Format(time.RFC3339)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", m.MessageID, m.Producer, m.EventType, oneLineText(m.Reason, 40), m.Attempts, ff, oneLineText(m.LastError, 60))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if len(msgs) == 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "(%s is empty)\n", publisher.PoisonQueueName(cfg.App))
			}
			return nil
		},
	}
	addFlags(cmd, "url", "app", "binary")
	addFormatFlag(cmd)
	cmd.Flags().Int("limit", 100, "how many messages from the head of the queue")
	return cmd
}

func newPoisonRedriveCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "redrive",
		Short: "Send parked messages back to the consumer's queue, attempts reset",
		Long: `redrive moves messages from <app>.poison back to the queue <app> with the
attempt count reset: all of them, the first --limit N, or those with the
given --id. Each is published with a confirm before its parked copy is
removed, so a crash midway loses nothing (a message may then be in both
queues; the inbox absorbs the duplicate).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			if err := requireApp(cfg); err != nil {
				return err
			}
			limit, _ := cmd.Flags().GetInt("limit")
			ids, _ := cmd.Flags().GetStringArray("id")
			if limit < 0 {
				return fmt.Errorf("flag --limit: must not be negative")
			}
			conn, err := publisher.Dial(cmd.Context(), connectionConfig(cfg, "warren poison redrive"))
			if err != nil {
				return err
			}
			defer conn.Close()
			var bar *progressbar.ProgressBar
			progress := func(done, total int) {
				if bar == nil {
					bar = progressbar.NewOptions(total,
						progressbar.OptionSetWriter(cmd.ErrOrStderr()),
						progressbar.OptionSetDescription("redrive "+cfg.App),
						progressbar.OptionShowCount(),
						progressbar.OptionShowIts(),
						progressbar.OptionSetItsString("msgs"),
						progressbar.OptionThrottle(100*time.Millisecond),
						progressbar.OptionClearOnFinish())
				}
				_ = bar.Set(done)
			}
			n, err := consumer.Redrive(cmd.Context(), conn, cfg.App, limit, ids, progress)
			if bar != nil {
				_ = bar.Finish()
			}
			if err != nil {
				return fmt.Errorf("redrive %s after %d messages: %w", cfg.App, n, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "redrove %d messages from %s to %s\n", n, publisher.PoisonQueueName(cfg.App), cfg.App)
			if len(ids) > 0 && n < len(ids) {
				fmt.Fprintf(cmd.OutOrStdout(), "%d of the given ids were not in %s\n", len(ids)-n, publisher.PoisonQueueName(cfg.App))
			}
			return nil
		},
	}
	addFlags(cmd, "url", "app")
	cmd.Flags().Int("limit", 0, "redrive at most this many (0 = all)")
	cmd.Flags().StringArray("id", nil, "redrive the message with this id (repeatable)")
	return cmd
}

func newPoisonPurgeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "purge --yes",
		Short: "Drop every parked message (asks for --yes)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			if err := requireApp(cfg); err != nil {
				return err
			}
			if yes, _ := cmd.Flags().GetBool("yes"); !yes {
				return fmt.Errorf("purge drops every message in %s for good: add --yes to confirm", publisher.PoisonQueueName(cfg.App))
			}
			conn, err := publisher.Dial(cmd.Context(), connectionConfig(cfg, "warren poison purge"))
			if err != nil {
				return err
			}
			defer conn.Close()
			n, err := consumer.Purge(cmd.Context(), conn, cfg.App)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "purged %d messages from %s\n", n, publisher.PoisonQueueName(cfg.App))
			return nil
		},
	}
	addFlags(cmd, "url", "app")
	cmd.Flags().Bool("yes", false, "really drop them")
	return cmd
}
