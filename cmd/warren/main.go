// Command warren is the outbox relay for RabbitMQ: it migrates a SQLite
// database, runs the relay and consumers, and answers audit questions.
//
// Run `warren --help` for the commands.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/warrenmq/warren/publisher"
	wsql "github.com/warrenmq/warren/sql"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run executes the command line and returns the exit code.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	root := newRoot(stdin, stdout, stderr)
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(stderr, "warren: "+publisherRedact(err.Error()))
		return 1
	}
	return 0
}

// publisherRedact strips a password that an underlying error might echo.
func publisherRedact(s string) string { return redactAll(s) }

func newRoot(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "warren",
		Short: "An outbox relay for RabbitMQ",
		Long: `warren moves events from a SQLite outbox table to RabbitMQ with publisher
confirms, and consumes them into an idempotent inbox table.

Settings come from flags, then WARREN_* environment variables, then the YAML
file given by --config, then defaults (database warren.db, the broker at
localhost:5672 as user guest).`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.PersistentFlags().String("config", "", "YAML configuration file (env WARREN_CONFIG)")
	root.AddCommand(
		newMigrateCmd(),
		newRelayCmd(),
		newOutboxCmd(),
		newTopologyCmd(),
		newConsumeCmd(),
		newInboxCmd(),
		newPoisonCmd(),
		newDemoCmd(),
		newStatusCmd(),
	)
	return root
}

// newLogger returns the logger for cfg, writing to w.
func newLogger(cfg Config, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// openDB opens cfg.Database and checks that it is migrated.
func openDB(ctx context.Context, cfg Config) (*dbHandle, error) {
	db, err := wsql.Open(ctx, cfg.Database, wsql.Options{})
	if err != nil {
		return nil, err
	}
	if err := wsql.Check(ctx, db); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("%s: %w", cfg.Database, err)
	}
	return &dbHandle{DB: db}, nil
}

// connectionConfig maps cfg to the publisher's connection settings.
func connectionConfig(cfg Config, name string) publisher.ConnectionConfig {
	return publisher.ConnectionConfig{
		URL:            cfg.URL,
		CAFile:         cfg.CAFile,
		CertFile:       cfg.CertFile,
		KeyFile:        cfg.KeyFile,
		ServerName:     cfg.ServerName,
		Heartbeat:      cfg.Heartbeat,
		TCPKeepAlive:   cfg.KeepAlive,
		ConnectionName: name,
	}
}

// signalContext returns a context cancelled by the first SIGINT or SIGTERM;
// a second signal exits the process at once with status 130.
func signalContext(parent context.Context, log *slog.Logger) (context.Context, func()) {
	ctx, cancel := context.WithCancel(parent)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		select {
		case s := <-sigs:
			log.Info("stopping: finishing in-flight work (send the signal again to exit at once)", "signal", s.String())
			cancel()
		case <-ctx.Done():
			return
		}
		s := <-sigs
		log.Warn("second signal: exiting at once; unconfirmed work is redone by the next run", "signal", s.String())
		os.Exit(130)
	}()
	return ctx, func() { signal.Stop(sigs); cancel() }
}

var errUsage = errors.New("usage")
