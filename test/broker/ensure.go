package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// Ensured is what EnsureNode found or did.
type Ensured struct {
	URL     string        // a URL that answers: the one asked for
	Node    *Node         // the private node behind URL; nil when another broker answered
	Started bool          // this call started Node
	Took    time.Duration // how long starting Node took
}

// Ensure returns a URL that answers: url itself if a broker answers there,
// else the same URL after starting a private node on url's port (or reusing
// the one that runs there already), with its data in dir. The node outlives
// this process; Lookup(dir) finds it again to stop it. Only a URL on this
// machine (localhost, 127.0.0.0/8) can be served so; for another one that
// does not answer Ensure says so. log, if not nil, hears of slow steps such
// as installing rabbitmq-server.
func Ensure(ctx context.Context, url string, dir string, log func(string)) (string, error) {
	r, err := EnsureNode(ctx, url, dir, log)
	return r.URL, err
}

// EnsureNode is Ensure that also tells whether it started a node.
func EnsureNode(ctx context.Context, rawURL string, dir string, log func(string)) (Ensured, error) {
	if log == nil {
		log = func(string) {}
	}
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "amqp" && u.Scheme != "amqps") || u.Host == "" {
		return Ensured{}, fmt.Errorf("broker URL %q: want amqp://user:password@host:port/vhost", redact(rawURL))
	}
	shown := u.Redacted()
	if Answers(ctx, rawURL) {
		return Ensured{URL: rawURL}, nil
	}
	if u.Scheme != "amqp" || !isLoopback(u.Hostname()) {
		return Ensured{}, fmt.Errorf("no broker answers at %s, and warren starts a broker of its own only for an amqp:// URL on this machine (localhost or 127.0.0.1): start that broker, or set WARREN_URL to one that answers", shown)
	}
	port := 5672
	if p := u.Port(); p != "" {
		if port, err = strconv.Atoi(p); err != nil {
			return Ensured{}, fmt.Errorf("broker URL %s: bad port %q", shown, p)
		}
	}

	if err := EnsureInstalled(ctx, log); err != nil {
		var missing *NotInstalledError
		if errors.As(err, &missing) {
			missing.Else = "set WARREN_URL to a broker that answers"
		}
		return Ensured{}, fmt.Errorf("no broker answers at %s, and %w", shown, err)
	}
	if Answers(ctx, rawURL) { // installing may have started the system's own broker there
		return Ensured{URL: rawURL}, nil
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Ensured{}, err
	}
	unlock, err := lockDir(ctx, dir)
	if err != nil {
		return Ensured{}, err
	}
	defer unlock()

	// Another process may have started the node while we waited for the
	// lock, or a node of ours may still be booting.
	if n, err := Lookup(dir); err == nil {
		if n.Port == port && n.waitBooted(ctx) == nil && Answers(ctx, rawURL) {
			return Ensured{URL: rawURL, Node: n}, nil
		}
		log(fmt.Sprintf("stopping node %s of %s: it does not answer at %s", n.Name, dir, shown))
		if err := n.Stop(); err != nil {
			return Ensured{}, err
		}
	}

	if l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port))); err != nil {
		// Something holds the port: perhaps a broker that is still
		// starting, such as the one the package just installed.
		if waitAnswers(ctx, rawURL, portTakenWait) {
			return Ensured{URL: rawURL}, nil
		}
		_, dialErr := dial(ctx, rawURL)
		return Ensured{}, fmt.Errorf("port %d on this machine is taken, but no broker answers there as %s (%v): stop what holds the port, or set WARREN_URL to a broker that answers", port, shown, dialErr)
	} else {
		l.Close()
	}

	started := time.Now()
	n, err := StartNode(ctx, Options{Name: fmt.Sprintf("warren-%d", port), Port: port, Dir: dir, Detach: true})
	if err != nil {
		return Ensured{}, fmt.Errorf("no broker answers at %s, and starting a private one failed (if its data in %s is damaged, remove that folder and try again): %w", shown, dir, err)
	}
	if err := grant(ctx, n, u); err != nil {
		n.Stop()
		return Ensured{}, err
	}
	return Ensured{URL: rawURL, Node: n, Started: true, Took: time.Since(started)}, nil
}

// portTakenWait is how long Ensure waits for a broker to answer on a port
// that something holds.
const portTakenWait = 10 * time.Second

func waitAnswers(ctx context.Context, url string, d time.Duration) bool {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		if Answers(ctx, url) {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// waitBooted waits, at most StartTimeout, until a node started by another
// process answers.
func (n *Node) waitBooted(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, StartTimeout)
	defer cancel()
	return n.waitReady(ctx)
}

// grant gives the URL's user, if it is not guest, and vhost, if it is not
// "/", to a node that does not know them yet, so that the URL answers there
// too.
func grant(ctx context.Context, n *Node, u *url.URL) error {
	if Answers(ctx, u.String()) {
		return nil
	}
	vhost := "/"
	if p := u.Path; len(p) > 1 {
		vhost, _ = url.PathUnescape(p[1:])
	}
	user := u.User.Username()
	pass, _ := u.User.Password()
	if vhost != "/" {
		if err := n.AddVhost(vhost); err != nil {
			return err
		}
	}
	if user != "" && user != "guest" {
		if err := n.AddUser(user, pass); err != nil {
			return err
		}
		if err := n.ctlDo("set_user_tags", user, "administrator"); err != nil {
			return err
		}
	}
	if user == "" {
		user = "guest"
	}
	if vhost != "/" || user != "guest" {
		return n.SetPermissions(user, vhost, ".*", ".*", ".*")
	}
	return nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.To4() != nil && ip.IsLoopback()
}

func redact(rawURL string) string {
	if u, err := url.Parse(rawURL); err == nil {
		return u.Redacted()
	}
	return "(unparsable URL)"
}

// lockDir takes an exclusive lock on dir, so that processes that ensure a
// broker at once start one node, not two.
func lockDir(ctx context.Context, dir string) (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for another process to start the broker in %s: %w", dir, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
