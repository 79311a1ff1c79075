package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/test/testenv"
)

// oneLineError runs warren and requires it to fail with exactly one line
// that contains every want and never the password.
func oneLineError(t *testing.T, env []string, stdin string, args []string, want ...string) {
	t.Helper()
	out, code := runWarren(t, env, stdin, args...)
	require.Equal(t, 1, code, "warren %v should fail:\n%s", args, out)
	out = strings.TrimSpace(out)
	require.NotContains(t, out, "\n", "warren %v: one line expected:\n%s", args, out)
	require.True(t, strings.HasPrefix(out, "warren: "), out)
	for _, w := range want {
		require.Contains(t, out, w, "warren %v", args)
	}
	require.NotContains(t, out, "s3cret")
}

func TestBadInputAndConfigurationGiveOneClearLine(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	fresh := filepath.Join(dir, "fresh.db")
	_, migrated := testenv.DB(t)
	broker := testenv.URL()
	hostPort := strings.SplitN(strings.SplitN(broker, "@", 2)[1], "/", 2)[0]

	oneLineError(t, nil, "", []string{"relay", "--db", fresh}, "warren migrate")
	oneLineError(t, nil, "", []string{"relay", "--db", migrated, "--url", "http://" + hostPort}, "--url", "amqp://")
	oneLineError(t, nil, "", []string{"relay", "--db", migrated, "--url", "amqp://guest:s3cret@" + hostPort + "/"}, "login refused", "guest")
	oneLineError(t, nil, "", []string{"relay", "--db", migrated, "--url", "amqp://guest:guest@" + hostPort + "/no-such-vhost"}, "no-such-vhost")
	oneLineError(t, nil, "", []string{"relay", "--db", migrated, "--url", "amqp://guest:s3cret@127.0.0.1:1/"}, "127.0.0.1:1")
	oneLineError(t, []string{"WARREN_URL=amqp://guest:s3cret@127.0.0.1:1/"}, "", []string{"relay", "--db", migrated}, "127.0.0.1:1")
	oneLineError(t, nil, "", []string{"outbox", "append", "--db", migrated, "--producer", "Billing Service", "--type", "x", "{}"}, "producer", "not an application name")
	oneLineError(t, nil, "", []string{"outbox", "append", "--db", migrated, "--producer", "crm", "{}"}, "type")
	oneLineError(t, nil, strings.Repeat("x", 1<<20+1), []string{"outbox", "append", "--db", migrated, "--producer", "crm", "--type", "big"}, "payload", "limit")
	oneLineError(t, []string{"WARREN_RELAY_WINDOW=many"}, "", []string{"relay", "--db", migrated}, "WARREN_RELAY_WINDOW")
	oneLineError(t, nil, "", []string{"relay", "--db", migrated, "--window", "-5"}, "--window")

	bad := filepath.Join(dir, "bad.yaml")
	for body, want := range map[string][]string{
		"amqp:\n  connection_strin: amqp://x/\n":        {"unknown setting", "amqp.connection_strin"},
		"consumer:\n  concurrency: lots\n":              {"consumer.concurrency", "whole number"},
		"consumer:\n  handler_timeout: -5s\n":           {"consumer.handler_timeout", "negative"},
		"amqp:\n  connection_string: ftp://h/\n":        {"amqp.connection_string", "amqp://"},
		"amqp:\n  declare: maybe\n":                     {"amqp.declare", "true or false"},
		"database: [a, b]\n":                            {"database", "single value"},
		"amqp: {connection_string: 'amqp://u:s3cret@\n": {"not valid YAML"},
	} {
		require.NoError(t, os.WriteFile(bad, []byte(body), 0o600))
		oneLineError(t, nil, "", []string{"relay", "--db", migrated, "--config", bad}, want...)
	}
}

func TestHelpNeverShowsAPassword(t *testing.T) {
	t.Parallel()
	env := []string{"WARREN_URL=amqp://user:s3cret@127.0.0.1:1/"}
	for _, args := range [][]string{{"--help"}, {"relay", "--help"}, {"migrate", "--help"}, {"outbox", "append", "--help"}, {"topology", "declare", "--help"}} {
		out, code := runWarren(t, env, "", args...)
		require.Equal(t, 0, code, out)
		require.NotContains(t, out, "s3cret")
		require.NotContains(t, out, "guest:guest", "the default password is not printed either")
	}
}

func TestShellAppendAndStatus(t *testing.T) {
	t.Parallel()
	_, path := testenv.DB(t)
	out, code := runWarren(t, nil, `{"from":"stdin"}`, "outbox", "append", "--db", path, "--producer", "crm", "--type", "company.updated", "--aggregate", "company:42", "--header", "tenant=acme")
	require.Equal(t, 0, code, out)
	require.Len(t, strings.TrimSpace(out), 36, "prints the new event id")
	out, code = runWarren(t, nil, "", "outbox", "status", "--db", path)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "crm")
	out, code = runWarren(t, nil, "", "outbox", "list", "--db", path, "--format", "json")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, `"from": "stdin"`)
	require.Contains(t, out, `"tenant": "acme"`)
}

func TestReadOnlyDatabaseGivesOneClearLineAndWritesNothing(t *testing.T) {
	t.Parallel()
	db, path := testenv.DB(t)
	require.NoError(t, db.Close())
	// As root, file modes do not stop writes; the immutable attribute does.
	out, err := exec.Command("chattr", "+i", path).CombinedOutput()
	require.NoError(t, err, "chattr +i: %s", out)
	t.Cleanup(func() { _ = exec.Command("chattr", "-i", path).Run() })
	before, err := os.ReadFile(path)
	require.NoError(t, err)

	oneLineError(t, nil, "", []string{"outbox", "append", "--db", path, "--producer", "crm", "--type", "t", "{}"}, "open database", path, "read-only")
	oneLineError(t, nil, "", []string{"relay", "--db", path}, "open database", path)
	oneLineError(t, nil, "", []string{"migrate", "--db", path}, path)

	after, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, before, after, "no partial write")
}
