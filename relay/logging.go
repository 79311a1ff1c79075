package relay

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
)

// quietLogger passes Watermill's logs through, but lets the same error
// message out at most once per interval, with the number it held back: a
// lost connection fails every in-flight publish at once, and one line says
// as much as 512. It also drops Trace, Debug and Info calls before
// Watermill's adapter turns their fields into attributes when the level is
// off: the router logs twice per message at Trace.
type quietLogger struct {
	watermill.LoggerAdapter
	state *quietState
	// trace and debug say whether those levels reach the handler (Info is
	// mapped to Debug).
	trace, debug bool
}

type quietState struct {
	mu       sync.Mutex
	interval time.Duration
	last     map[string]time.Time
	held     map[string]int
}

// newQuietLogger logs to log through Watermill's slog adapter, Info
// mapped to Debug.
func newQuietLogger(log *slog.Logger, interval time.Duration) watermill.LoggerAdapter {
	l := watermill.NewSlogLoggerWithLevelMapping(log, map[slog.Level]slog.Level{slog.LevelInfo: slog.LevelDebug})
	ctx := context.Background()
	return &quietLogger{
		LoggerAdapter: l,
		state:         &quietState{interval: interval, last: map[string]time.Time{}, held: map[string]int{}},
		trace:         log.Enabled(ctx, watermill.LevelTrace),
		debug:         log.Enabled(ctx, slog.LevelDebug),
	}
}

func (q *quietLogger) Trace(msg string, fields watermill.LogFields) {
	if q.trace {
		q.LoggerAdapter.Trace(msg, fields)
	}
}

func (q *quietLogger) Debug(msg string, fields watermill.LogFields) {
	if q.debug {
		q.LoggerAdapter.Debug(msg, fields)
	}
}

func (q *quietLogger) Info(msg string, fields watermill.LogFields) {
	if q.debug {
		q.LoggerAdapter.Info(msg, fields)
	}
}

func (q *quietLogger) Error(msg string, err error, fields watermill.LogFields) {
	s := q.state
	s.mu.Lock()
	now := time.Now()
	if now.Sub(s.last[msg]) < s.interval {
		s.held[msg]++
		s.mu.Unlock()
		return
	}
	held := s.held[msg]
	s.last[msg], s.held[msg] = now, 0
	s.mu.Unlock()
	if held > 0 {
		fields = fields.Add(watermill.LogFields{"similar_errors_not_logged": held})
	}
	q.LoggerAdapter.Error(msg, err, fields)
}

func (q *quietLogger) With(fields watermill.LogFields) watermill.LoggerAdapter {
	return &quietLogger{LoggerAdapter: q.LoggerAdapter.With(fields), state: q.state, trace: q.trace, debug: q.debug}
}
