package outbox

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Watcher tells when the database file may hold new outbox rows, within
// milliseconds of a commit by any process: in WAL mode every commit writes
// the -wal file, and inotify reports the write. It also ticks every
// Fallback, a safety net for file systems without change notification.
type Watcher struct {
	C <-chan struct{}

	w      *fsnotify.Watcher
	notify chan struct{}
	done   chan struct{}
	closed chan struct{}
}

// DefaultWatchFallback is how often a Watcher ticks without a notification.
const DefaultWatchFallback = 30 * time.Second

// Watch starts watching the database file dbPath. fallback <= 0 means
// DefaultWatchFallback. Close it when done.
func Watch(dbPath string, fallback time.Duration, logger *slog.Logger) (*Watcher, error) {
	if fallback <= 0 {
		fallback = DefaultWatchFallback
	}
	if logger == nil {
		logger = slog.Default()
	}
	abs, err := filepath.Abs(dbPath)
	if err != nil {
		return nil, fmt.Errorf("watch %s: %w", dbPath, err)
	}
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("watch %s: %w", dbPath, err)
	}
	// Watch the directory: the -wal file comes and goes with checkpoints.
	if err := fw.Add(filepath.Dir(abs)); err != nil {
		_ = fw.Close()
		return nil, fmt.Errorf("watch %s: %w", filepath.Dir(abs), err)
	}
	notify := make(chan struct{}, 1)
	w := &Watcher{C: notify, w: fw, notify: notify, done: make(chan struct{}), closed: make(chan struct{})}
	targets := map[string]bool{abs: true, abs + "-wal": true}
	go func() {
		defer close(w.closed)
		t := time.NewTicker(fallback)
		defer t.Stop()
		for {
			select {
			case <-w.done:
				return
			case ev, ok := <-fw.Events:
				if !ok {
					return
				}
				if targets[ev.Name] && ev.Op&(fsnotify.Write|fsnotify.Create) != 0 {
					w.Poke()
				}
			case err, ok := <-fw.Errors:
				if !ok {
					return
				}
				logger.Warn("outbox watcher error; falling back to periodic reads", "err", err, "every", fallback)
				w.Poke()
			case <-t.C:
				w.Poke()
			}
		}
	}()
	return w, nil
}

// Poke wakes the reader as if the file had changed.
func (w *Watcher) Poke() {
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

// Close stops watching. It is safe to call twice.
func (w *Watcher) Close() error {
	select {
	case <-w.done:
		return nil
	default:
	}
	close(w.done)
	err := w.w.Close()
	<-w.closed
	return err
}
