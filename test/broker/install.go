package broker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// NoInstallEnv names the environment variable that, when set to anything,
// forbids EnsureInstalled to install rabbitmq-server.
const NoInstallEnv = "WARREN_NO_INSTALL"

// ErrNotInstalled is matched (errors.Is) by the error returned when
// rabbitmq-server is missing and could not be installed.
var ErrNotInstalled = errors.New("rabbitmq-server is not installed")

// NotInstalledError says that rabbitmq-server is missing, why it was not
// installed, and what to do.
type NotInstalledError struct {
	Path   string // the script that was looked for
	Reason string // why it was not installed, e.g. "WARREN_NO_INSTALL is set, so warren did not install it"
	Else   string // another way out, if there is one, e.g. "set WARREN_URL to a broker that answers"
}

func (e *NotInstalledError) Error() string {
	msg := fmt.Sprintf("rabbitmq-server is not installed (no %s), and %s: install it with `%s`", e.Path, e.Reason, installCommand())
	if e.Else != "" {
		msg += ", or " + e.Else
	}
	return msg
}

// installCommand is what the user would type to install rabbitmq-server.
func installCommand() string {
	if os.Geteuid() == 0 {
		return "apt-get install -y rabbitmq-server"
	}
	return "sudo apt-get install -y rabbitmq-server"
}

func (e *NotInstalledError) Is(target error) bool { return target == ErrNotInstalled }

// serverPath is the rabbitmq-server script to run, if it is installed.
func serverPath() (string, error) {
	path := DefaultServer
	if p := os.Getenv(ServerEnv); p != "" {
		path = p
	}
	if _, err := os.Stat(path); err != nil {
		return "", &NotInstalledError{Path: path, Reason: "private RabbitMQ nodes need it (`go tool task test` installs it when run as root or with passwordless sudo)"}
	}
	return path, nil
}

// EnsureInstalled installs Debian's rabbitmq-server package with apt-get
// when it is missing, if this process runs as root or may use sudo without
// a password, and NoInstallEnv is not set. Otherwise it returns a
// *NotInstalledError that says what to do. log hears what it does.
func EnsureInstalled(ctx context.Context, log func(string)) error {
	_, err := serverPath()
	if err == nil {
		return nil
	}
	if log == nil {
		log = func(string) {}
	}
	missing := err.(*NotInstalledError)
	if os.Getenv(NoInstallEnv) != "" {
		missing.Reason = NoInstallEnv + " is set, so warren did not install it"
		return missing
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		missing.Reason = "there is no apt-get here to install it with (use this system's package manager)"
		return missing
	}
	var sudo []string
	if os.Geteuid() != 0 {
		if exec.CommandContext(ctx, "sudo", "-n", "true").Run() != nil {
			missing.Reason = "warren cannot install it without root or passwordless sudo"
			return missing
		}
		sudo = []string{"sudo", "-n"}
	}

	log("rabbitmq-server is not installed; installing it: " + strings.Join(append(sudo, "apt-get", "install", "-y", "rabbitmq-server"), " "))
	started := time.Now()
	if _, err := apt(ctx, sudo, "install", "-y", "rabbitmq-server"); err != nil {
		// A fresh machine may have no package lists yet.
		if out, err := apt(ctx, sudo, "update"); err != nil {
			return fmt.Errorf("apt-get update: %w\n%s", err, lastLines(out, 15))
		}
		if out, err := apt(ctx, sudo, "install", "-y", "rabbitmq-server"); err != nil {
			return fmt.Errorf("apt-get install -y rabbitmq-server: %w\n%s", err, lastLines(out, 15))
		}
	}
	if _, err := serverPath(); err != nil {
		missing.Reason = "apt-get installed the package, but " + missing.Path + " is still missing"
		return missing
	}
	log(fmt.Sprintf("installed rabbitmq-server in %.0fs", time.Since(started).Seconds()))
	return nil
}

func apt(ctx context.Context, sudo []string, args ...string) (string, error) {
	argv := append(append(sudo, "apt-get"), args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	return out.String(), err
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
