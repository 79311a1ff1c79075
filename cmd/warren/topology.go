package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/publisher"
)

func newTopologyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "topology",
		Short: "Declare or verify exchanges and queues",
		Long: `topology declares the exchanges and queues warren uses, or only checks that
they exist as expected (for brokers where warren may not declare).

  warren topology declare --producer crm
  warren topology verify --producer crm --app billing --from crm`,
	}
	for _, verify := range []bool{false, true} {
		verify := verify
		use, short := "declare", "Declare the exchanges and queues"
		if verify {
			use, short = "verify", "Check that the exchanges and queues exist as expected"
		}
		sub := &cobra.Command{
			Use:   use,
			Short: short,
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				cfg, err := loadConfig(cmd)
				if err != nil {
					return err
				}
				producers, _ := cmd.Flags().GetStringArray("producer")
				if len(producers) == 0 && cfg.App == "" {
					return fmt.Errorf("nothing to %s: give --producer NAME and/or --app NAME --from PRODUCER", use)
				}
				conn, err := publisher.Dial(cmd.Context(), connectionConfig(cfg, "warren topology"))
				if err != nil {
					return err
				}
				defer conn.Close()
				for _, p := range producers {
					if verify {
						err = publisher.VerifyExchange(cmd.Context(), conn, p)
					} else {
						err = publisher.DeclareExchange(cmd.Context(), conn, p)
					}
					if err != nil {
						return err
					}
					fmt.Fprintf(cmd.OutOrStdout(), "exchange %s: %s\n", publisher.ExchangeName(p), map[bool]string{false: "declared", true: "ok"}[verify])
				}
				if cfg.App != "" {
					return consumerTopologyCmd(cmd, cfg, conn, verify)
				}
				return nil
			},
		}
		addFlags(sub, "url", "app", "from", "queue-type", "retry-delays")
		sub.Flags().StringArray("producer", nil, "a producer whose exchange <producer>.events to "+use+" (repeatable)")
		cmd.AddCommand(sub)
	}
	return cmd
}
