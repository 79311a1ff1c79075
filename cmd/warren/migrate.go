package main

import (
	"fmt"

	"github.com/spf13/cobra"

	wsql "github.com/warrenmq/warren/sql"
)

func newMigrateCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Create or upgrade the warren tables in the database",
		Long: `migrate creates warren_outbox and warren_inbox (and warren_schema, which
records the version) in the SQLite database, or upgrades them. Running it
again is a no-op. A database migrated by a newer warren is refused.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			db, err := wsql.Open(cmd.Context(), cfg.Database, wsql.Options{})
			if err != nil {
				return err
			}
			defer db.Close()
			applied, err := wsql.Migrate(cmd.Context(), db)
			if err != nil {
				return fmt.Errorf("%s: %w", cfg.Database, err)
			}
			if len(applied) == 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "%s is up to date (schema version %d)\n", cfg.Database, wsql.LatestVersion())
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s migrated to schema version %d (applied %v)\n", cfg.Database, wsql.LatestVersion(), applied)
			return nil
		},
	}
	addFlags(cmd, "db")
	return cmd
}
