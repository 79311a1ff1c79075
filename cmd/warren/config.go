package main

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"gopkg.in/yaml.v3"

	"github.com/warrenmq/warren/consumer"
	"github.com/warrenmq/warren/publisher"
)

// Config is every setting of the warren command. Settings come from flags,
// then WARREN_* environment variables, then the YAML file given by --config,
// then these defaults.
type Config struct {
	Database    string
	URL         string
	Heartbeat   time.Duration
	KeepAlive   time.Duration
	Declare     bool
	CAFile      string
	CertFile    string
	KeyFile     string
	ServerName  string
	MetricsAddr string
	LogFormat   string
	LogLevel    string

	App             string
	From            []string
	Sink            string
	Concurrency     int
	Prefetch        int
	HandlerTimeout  time.Duration
	MaxAttempts     int
	RetryDelays     []time.Duration
	AutoAck         bool
	Binary          bool
	Expiration      time.Duration
	QueueType       string
	MaxPayloadBytes int

	RelayWindow     int
	RelayUnroutable string

	// OutboxRetention and InboxRetention are how long published outbox
	// rows and processed inbox rows are kept; 0 keeps them forever.
	OutboxRetention time.Duration
	InboxRetention  time.Duration
}

func defaultConfig() Config {
	return Config{
		Database:        "warren.db",
		URL:             "amqp://guest:guest@localhost:5672/",
		Heartbeat:       10 * time.Second,
		KeepAlive:       30 * time.Second,
		Declare:         true,
		LogFormat:       "text",
		LogLevel:        "info",
		Sink:            "inbox",
		Concurrency:     consumer.DefaultConcurrency,
		HandlerTimeout:  30 * time.Second,
		MaxAttempts:     5,
		RetryDelays:     []time.Duration{time.Second, 10 * time.Second, time.Minute, 10 * time.Minute},
		QueueType:       "quorum",
		MaxPayloadBytes: 1 << 20,
		RelayWindow:     512,
		RelayUnroutable: "count",
		OutboxRetention: 7 * day,
		InboxRetention:  30 * day,
	}
}

// setting is one configurable value: its YAML key, flag and environment
// variable (either may be empty), and how to parse it.
type setting struct {
	key  string // YAML path, e.g. "amqp.connection_string"
	flag string
	env  string
	help string
	set  func(c *Config, v string) error
	list bool // YAML takes a list; flags repeat
}

func str(f func(*Config) *string) func(*Config, string) error {
	return func(c *Config, v string) error { *f(c) = v; return nil }
}

func oneOf(f func(*Config) *string, allowed ...string) func(*Config, string) error {
	return func(c *Config, v string) error {
		for _, a := range allowed {
			if v == a {
				*f(c) = v
				return nil
			}
		}
		return fmt.Errorf("%q is not one of %s", v, strings.Join(allowed, ", "))
	}
}

func boolean(f func(*Config) *bool) func(*Config, string) error {
	return func(c *Config, v string) error {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("%q is not true or false", v)
		}
		*f(c) = b
		return nil
	}
}

func integer(f func(*Config) *int, minimum int) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			return fmt.Errorf("%q is not a whole number", v)
		}
		if n < minimum {
			return fmt.Errorf("%d is below the minimum of %d", n, minimum)
		}
		*f(c) = n
		return nil
	}
}

func parseDuration(v string) (time.Duration, error) {
	d, err := time.ParseDuration(strings.TrimSpace(v))
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration such as 500ms, 10s or 5m", v)
	}
	if d < 0 {
		return 0, fmt.Errorf("%s is negative", v)
	}
	return d, nil
}

const day = 24 * time.Hour

// retention parses a retention: a duration (12h), a number of days (7d)
// or 0 for forever.
func retention(f func(*Config) *time.Duration) func(*Config, string) error {
	return func(c *Config, v string) error {
		v = strings.TrimSpace(v)
		if days, ok := strings.CutSuffix(v, "d"); ok {
			n, err := strconv.Atoi(days)
			if err != nil || n < 0 {
				return fmt.Errorf("%q is not a number of days such as 7d, nor a duration such as 12h (0 keeps rows forever)", v)
			}
			*f(c) = time.Duration(n) * day
			return nil
		}
		d, err := parseDuration(v)
		if err != nil {
			return fmt.Errorf("%q is not a number of days such as 7d, nor a duration such as 12h (0 keeps rows forever)", v)
		}
		*f(c) = d
		return nil
	}
}

// formatRetention writes a retention the way retention reads it.
func formatRetention(d time.Duration) string {
	switch {
	case d == 0:
		return "0"
	case d%day == 0:
		return strconv.Itoa(int(d/day)) + "d"
	}
	return publisher.FormatDelay(d)
}

func duration(f func(*Config) *time.Duration) func(*Config, string) error {
	return func(c *Config, v string) error {
		d, err := parseDuration(v)
		if err != nil {
			return err
		}
		*f(c) = d
		return nil
	}
}

// settings lists every setting. Keys and spellings are part of the contract.
var settings = []setting{
	{key: "database", flag: "db", env: "WARREN_DB", help: "SQLite database file", set: str(func(c *Config) *string { return &c.Database })},
	{key: "amqp.connection_string", flag: "url", env: "WARREN_URL", help: "broker URL, amqp:// or amqps://; the vhost is its path", set: func(c *Config, v string) error {
		if !strings.HasPrefix(v, "amqp://") && !strings.HasPrefix(v, "amqps://") {
			return errors.New("the URL must start with amqp:// or amqps://")
		}
		c.URL = v
		return nil
	}},
	{key: "amqp.consumer_heartbeat", env: "WARREN_HEARTBEAT", help: "AMQP heartbeat interval", set: duration(func(c *Config) *time.Duration { return &c.Heartbeat })},
	{key: "amqp.tcp_keepalive_timeout", env: "WARREN_TCP_KEEPALIVE", help: "TCP keepalive period", set: duration(func(c *Config) *time.Duration { return &c.KeepAlive })},
	{key: "amqp.declare", flag: "declare", env: "WARREN_DECLARE", help: "declare the topology (true) or only verify it exists (false)", set: boolean(func(c *Config) *bool { return &c.Declare })},
	{key: "amqp.tls.ca_file", env: "WARREN_TLS_CA_FILE", help: "CA certificate to verify the broker (amqps)", set: str(func(c *Config) *string { return &c.CAFile })},
	{key: "amqp.tls.cert_file", env: "WARREN_TLS_CERT_FILE", help: "client certificate (amqps)", set: str(func(c *Config) *string { return &c.CertFile })},
	{key: "amqp.tls.key_file", env: "WARREN_TLS_KEY_FILE", help: "client key (amqps)", set: str(func(c *Config) *string { return &c.KeyFile })},
	{key: "amqp.tls.server_name", env: "WARREN_TLS_SERVER_NAME", help: "TLS server name, if not the URL's host", set: str(func(c *Config) *string { return &c.ServerName })},
	{key: "metrics_addr", flag: "metrics-addr", env: "WARREN_METRICS_ADDR", help: "address for /metrics, /healthz and /readyz (off when empty)", set: str(func(c *Config) *string { return &c.MetricsAddr })},
	{key: "log_format", flag: "log-format", env: "WARREN_LOG_FORMAT", help: "log format: text or json", set: oneOf(func(c *Config) *string { return &c.LogFormat }, "text", "json")},
	{key: "log_level", flag: "log-level", env: "WARREN_LOG_LEVEL", help: "log level: debug, info, warn or error", set: oneOf(func(c *Config) *string { return &c.LogLevel }, "debug", "info", "warn", "error")},

	{key: "consumer.app", flag: "app", env: "WARREN_APP", help: "the consuming application's name", set: str(func(c *Config) *string { return &c.App })},
	{key: "consumer.from", flag: "from", list: true, help: "subscription producer[:key,key] (repeatable)", set: func(c *Config, v string) error {
		c.From = append(c.From, v)
		return nil
	}},
	{key: "consumer.sink", flag: "sink", help: "inbox, or an http(s):// URL that receives each delivery as JSON", set: func(c *Config, v string) error {
		if v != "inbox" && !strings.HasPrefix(v, "http://") && !strings.HasPrefix(v, "https://") {
			return fmt.Errorf("%q is neither inbox nor an http:// or https:// URL", v)
		}
		c.Sink = v
		return nil
	}},
	{key: "consumer.concurrency", flag: "concurrency", help: "handlers at once", set: integer(func(c *Config) *int { return &c.Concurrency }, 1)},
	{key: "consumer.prefetch", flag: "prefetch", help: "unacked deliveries (default twice the concurrency)", set: integer(func(c *Config) *int { return &c.Prefetch }, 1)},
	{key: "consumer.handler_timeout", flag: "handler-timeout", help: "longest a handler may run", set: duration(func(c *Config) *time.Duration { return &c.HandlerTimeout })},
	{key: "consumer.max_attempts", flag: "max-attempts", help: "attempts before a delivery is poisoned", set: integer(func(c *Config) *int { return &c.MaxAttempts }, 1)},
	{key: "consumer.retry_delays", flag: "retry-delays", list: true, help: "delays of the retry queues, e.g. 1s,10s,1m,10m", set: func(c *Config, v string) error {
		var ds []time.Duration
		for _, part := range strings.Split(v, ",") {
			if strings.TrimSpace(part) == "" {
				continue
			}
			d, err := parseDuration(part)
			if err != nil {
				return err
			}
			if d == 0 {
				return errors.New("a retry delay must be positive")
			}
			ds = append(ds, d)
		}
		c.RetryDelays = ds
		return nil
	}},
	{key: "consumer.auto_ack", flag: "auto-ack", help: "ack on delivery: a failed handler loses the message", set: boolean(func(c *Config) *bool { return &c.AutoAck })},
	{key: "consumer.binary", flag: "binary", help: "send bodies base64-encoded in the JSON", set: boolean(func(c *Config) *bool { return &c.Binary })},
	{key: "consumer.expiration", flag: "expiration", help: "park deliveries that waited longer than this (0 = off)", set: duration(func(c *Config) *time.Duration { return &c.Expiration })},
	{key: "consumer.queue_type", flag: "queue-type", help: "quorum or classic", set: oneOf(func(c *Config) *string { return &c.QueueType }, "quorum", "classic")},
	{key: "outbox.max_payload_bytes", flag: "max-payload-bytes", env: "WARREN_MAX_PAYLOAD_BYTES", help: "largest payload accepted", set: integer(func(c *Config) *int { return &c.MaxPayloadBytes }, 1)},
	{key: "relay.window", flag: "window", env: "WARREN_RELAY_WINDOW", help: "publishes awaiting a confirm at once", set: integer(func(c *Config) *int { return &c.RelayWindow }, 1)},
	{key: "outbox_retention", flag: "outbox-retention", env: "WARREN_OUTBOX_RETENTION", help: "keep published outbox rows this long, e.g. 7d or 12h; the relay prunes older ones hourly (0 = forever)", set: retention(func(c *Config) *time.Duration { return &c.OutboxRetention })},
	{key: "inbox_retention", flag: "inbox-retention", env: "WARREN_INBOX_RETENTION", help: "keep processed inbox rows this long, e.g. 30d; the consumer prunes older ones hourly; retrying and poisoned rows are kept (0 = forever)", set: retention(func(c *Config) *time.Duration { return &c.InboxRetention })},
	{key: "relay.unroutable", flag: "unroutable", env: "WARREN_RELAY_UNROUTABLE", help: "an event no queue is bound for: count (log it, mark it published) or keep (leave it in the outbox)", set: oneOf(func(c *Config) *string { return &c.RelayUnroutable }, "count", "keep")},
}

// typeName is what --help shows for the flag's value.
func (s *setting) typeName() string {
	switch s.flag {
	case "declare", "auto-ack", "binary":
		return "bool"
	case "concurrency", "prefetch", "max-attempts", "max-payload-bytes", "window":
		return "int"
	case "handler-timeout", "expiration", "outbox-retention", "inbox-retention":
		return "duration"
	case "retry-delays":
		return "durations"
	case "url", "sink":
		return "url"
	case "db":
		return "file"
	}
	return "string"
}

// flagValue holds a flag's text; the setting's parser reads it, so a flag,
// an environment variable and a YAML key are parsed alike.
type flagValue struct{ typ, val string }

func (v *flagValue) String() string     { return v.val }
func (v *flagValue) Set(s string) error { v.val = s; return nil }
func (v *flagValue) Type() string       { return v.typ }

func settingByFlag(name string) *setting {
	for i := range settings {
		if settings[i].flag == name {
			return &settings[i]
		}
	}
	return nil
}

// addFlags registers the flags of the named settings on cmd.
func addFlags(cmd *cobra.Command, flags ...string) {
	def := defaultConfig()
	for _, name := range flags {
		s := settingByFlag(name)
		if s == nil {
			panic("no setting for flag " + name) // programming error, caught by tests
		}
		help := s.help
		if s.env != "" {
			help += " (env " + s.env + ")"
		}
		help += " [" + s.key + "]"
		if s.list {
			cmd.Flags().StringArray(name, nil, help)
			continue
		}
		v := &flagValue{typ: s.typeName(), val: redactAll(defaultString(def, name))}
		f := cmd.Flags().VarPF(v, name, "", help)
		if v.typ == "bool" {
			f.NoOptDefVal = "true"
		}
	}
}

func defaultString(c Config, flag string) string {
	switch flag {
	case "db":
		return c.Database
	case "url":
		return c.URL
	case "declare":
		return strconv.FormatBool(c.Declare)
	case "log-format":
		return c.LogFormat
	case "log-level":
		return c.LogLevel
	case "sink":
		return c.Sink
	case "concurrency":
		return strconv.Itoa(c.Concurrency)
	case "handler-timeout":
		return c.HandlerTimeout.String()
	case "max-attempts":
		return strconv.Itoa(c.MaxAttempts)
	case "auto-ack", "binary":
		return "false"
	case "queue-type":
		return c.QueueType
	case "max-payload-bytes":
		return strconv.Itoa(c.MaxPayloadBytes)
	case "window":
		return strconv.Itoa(c.RelayWindow)
	case "unroutable":
		return c.RelayUnroutable
	case "retry-delays":
		return "1s,10s,1m,10m"
	case "outbox-retention":
		return formatRetention(c.OutboxRetention)
	case "inbox-retention":
		return formatRetention(c.InboxRetention)
	}
	return ""
}

// loadConfig builds the configuration for cmd: defaults, then the YAML file,
// then the environment, then the flags given on the command line. Every
// error names the setting and where it came from.
func loadConfig(cmd *cobra.Command) (Config, error) {
	c := defaultConfig()
	file, _ := cmd.Flags().GetString("config")
	if file == "" {
		file = os.Getenv("WARREN_CONFIG")
	}
	if file != "" {
		if err := applyFile(&c, file); err != nil {
			return c, err
		}
	}
	for _, s := range settings {
		if s.env == "" {
			continue
		}
		if v, ok := os.LookupEnv(s.env); ok {
			if err := s.set(&c, v); err != nil {
				return c, fmt.Errorf("environment %s: %w", s.env, err)
			}
		}
	}
	fromFlags := false
	for _, s := range settings {
		if s.flag == "" {
			continue
		}
		f := cmd.Flags().Lookup(s.flag)
		if f == nil || !f.Changed {
			continue
		}
		if s.list {
			vals, _ := cmd.Flags().GetStringArray(s.flag)
			if s.key == "consumer.from" && !fromFlags {
				c.From, fromFlags = nil, true
			}
			if s.key == "consumer.retry_delays" {
				vals = []string{strings.Join(vals, ",")}
			}
			for _, v := range vals {
				if err := s.set(&c, v); err != nil {
					return c, fmt.Errorf("flag --%s: %w", s.flag, err)
				}
			}
			continue
		}
		if err := s.set(&c, f.Value.String()); err != nil {
			return c, fmt.Errorf("flag --%s: %w", s.flag, err)
		}
	}
	if c.Prefetch == 0 {
		c.Prefetch = 2 * c.Concurrency
	}
	return c, nil
}

// applyFile reads a YAML file and applies it through the same parsers as
// flags, so an error names the setting ("consumer.concurrency: ...") and an
// unknown key is refused.
func applyFile(c *Config, file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("config file: %w", err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return fmt.Errorf("config file %s: not valid YAML: %w", file, err)
	}
	flat := map[string]any{}
	flatten("", doc, flat)
	keys := make([]string, 0, len(flat))
	for k := range flat {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	byKey := map[string]*setting{}
	for i := range settings {
		byKey[settings[i].key] = &settings[i]
	}
	for _, k := range keys {
		s := byKey[k]
		if s == nil {
			return fmt.Errorf("config file %s: unknown setting %q", file, k)
		}
		v := flat[k]
		if s.list {
			items, ok := v.([]any)
			if !ok {
				items = []any{v}
			}
			var strs []string
			for _, it := range items {
				if _, nested := it.(map[string]any); nested {
					return fmt.Errorf("config file %s: %s: a list of plain values is expected", file, k)
				}
				strs = append(strs, fmt.Sprint(it))
			}
			if k == "consumer.retry_delays" {
				strs = []string{strings.Join(strs, ",")}
			}
			for _, sv := range strs {
				if err := s.set(c, sv); err != nil {
					return fmt.Errorf("config file %s: %s: %w", file, k, err)
				}
			}
			continue
		}
		if _, isList := v.([]any); isList {
			return fmt.Errorf("config file %s: %s: a single value is expected, not a list", file, k)
		}
		sv := ""
		if v != nil {
			sv = fmt.Sprint(v)
		}
		if err := s.set(c, sv); err != nil {
			return fmt.Errorf("config file %s: %s: %w", file, k, err)
		}
	}
	return nil
}

func flatten(prefix string, m map[string]any, out map[string]any) {
	for k, v := range m {
		key := k
		if prefix != "" {
			key = prefix + "." + k
		}
		if sub, ok := v.(map[string]any); ok {
			flatten(key, sub, out)
			continue
		}
		out[key] = v
	}
}
