package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/stretchr/testify/require"
)

// allFlagsCmd is a command carrying every setting's flag.
func allFlagsCmd(t *testing.T) *cobra.Command {
	t.Helper()
	cmd := &cobra.Command{Use: "x"}
	cmd.Flags().String("config", "", "")
	var flags []string
	for _, s := range settings {
		if s.flag != "" {
			flags = append(flags, s.flag)
		}
	}
	addFlags(cmd, flags...)
	return cmd
}

// badValues gives, for every setting whose parser can refuse a value, one
// value of the wrong type or range.
var badValues = map[string][]string{
	"amqp.connection_string":     {"http://host/", "localhost:5672"},
	"amqp.consumer_heartbeat":    {"ten seconds", "-5s"},
	"amqp.tcp_keepalive_timeout": {"often", "-1m"},
	"amqp.declare":               {"maybe"},
	"log_format":                 {"xml"},
	"log_level":                  {"loud"},
	"consumer.sink":              {"ftp://x/"},
	"consumer.concurrency":       {"many", "0", "-3"},
	"consumer.prefetch":          {"1.5", "-1"},
	"consumer.handler_timeout":   {"30", "-30s"},
	"consumer.max_attempts":      {"five", "0"},
	"consumer.retry_delays":      {"1s,soon", "1s,-2s", "0s"},
	"consumer.auto_ack":          {"yes please"},
	"consumer.binary":            {"2"},
	"consumer.expiration":        {"a day", "-1h"},
	"consumer.queue_type":        {"stream"},
	"outbox.max_payload_bytes":   {"1MiB", "0"},
	"relay.window":               {"wide", "-512"},
	"outbox_retention":           {"a week", "-7d"},
	"inbox_retention":            {"forever-ish"},
	"relay.unroutable":           {"drop"},
}

func TestEverySettingRefusesWrongValuesNamingItself(t *testing.T) {
	// Every setting that can be wrong is listed (a new setting must be added
	// here with its wrong values).
	for _, s := range settings {
		switch s.key {
		case "database", "amqp.tls.ca_file", "amqp.tls.cert_file", "amqp.tls.key_file", "amqp.tls.server_name", "metrics_addr", "consumer.app", "consumer.from":
			continue // free text, checked where it is used
		}
		require.Contains(t, badValues, s.key, "no wrong values listed for setting %s", s.key)
	}
	for _, s := range settings {
		for _, bad := range badValues[s.key] {
			// YAML: the key names it.
			file := filepath.Join(t.TempDir(), "c.yaml")
			parts := strings.Split(s.key, ".")
			yaml := ""
			for i, p := range parts {
				yaml += strings.Repeat("  ", i) + p + ":"
				if i < len(parts)-1 {
					yaml += "\n"
				}
			}
			yaml += " '" + bad + "'\n"
			require.NoError(t, os.WriteFile(file, []byte(yaml), 0o600))
			c := defaultConfig()
			err := applyFile(&c, file)
			require.Error(t, err, "YAML %s: %q accepted", s.key, bad)
			require.Contains(t, err.Error(), s.key)
			require.NotContains(t, err.Error(), "\n", "one line")

			if s.env != "" {
				t.Setenv(s.env, bad)
				_, err := loadConfig(allFlagsCmd(t))
				require.Error(t, err, "env %s=%q accepted", s.env, bad)
				require.Contains(t, err.Error(), s.env)
				require.NoError(t, os.Unsetenv(s.env))
			}
			if s.flag != "" {
				cmd := allFlagsCmd(t)
				require.NoError(t, cmd.Flags().Parse([]string{"--" + s.flag + "=" + bad}))
				_, err := loadConfig(cmd)
				require.Error(t, err, "flag --%s=%q accepted", s.flag, bad)
				require.Contains(t, err.Error(), "--"+s.flag)
			}
		}
	}
}

func TestUnknownKeysAndPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "c.yaml")
	require.NoError(t, os.WriteFile(file, []byte("consumer:\n  concurency: 4\n"), 0o600))
	c := defaultConfig()
	err := applyFile(&c, file)
	require.ErrorContains(t, err, `unknown setting "consumer.concurency"`)

	require.NoError(t, os.WriteFile(file, []byte("database: from-yaml.db\nrelay:\n  window: 100\nconsumer:\n  concurrency: 4\n  retry_delays: [2s, 20s]\n"), 0o600))
	t.Setenv("WARREN_DB", "from-env.db")
	t.Setenv("WARREN_RELAY_WINDOW", "200")
	cmd := allFlagsCmd(t)
	require.NoError(t, cmd.Flags().Parse([]string{"--config", file, "--window", "300"}))
	cfg, err := loadConfig(cmd)
	require.NoError(t, err)
	require.Equal(t, "from-env.db", cfg.Database, "env beats YAML")
	require.Equal(t, 300, cfg.RelayWindow, "flag beats env")
	require.Equal(t, 4, cfg.Concurrency, "YAML beats the default")
	require.Equal(t, 8, cfg.Prefetch, "prefetch defaults to twice the concurrency")
	require.Equal(t, []time.Duration{2 * time.Second, 20 * time.Second}, cfg.RetryDelays)
	require.Equal(t, "amqp://guest:guest@localhost:5672/", cfg.URL, "the default")
}
