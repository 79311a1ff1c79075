package relay

import (
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
)

// quietLogger passes Watermill's logs through, but lets the same error
// message out at most once per interval, with the number it held back: a
// lost connection fails every in-flight publish at once, and one line says
// as much as 512.
type quietLogger struct {
	watermill.LoggerAdapter
	state *quietState
}

type quietState struct {
	mu       sync.Mutex
	interval time.Duration
	last     map[string]time.Time
	held     map[string]int
}

func newQuietLogger(l watermill.LoggerAdapter, interval time.Duration) watermill.LoggerAdapter {
	return &quietLogger{LoggerAdapter: l, state: &quietState{interval: interval, last: map[string]time.Time{}, held: map[string]int{}}}
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
	return &quietLogger{LoggerAdapter: q.LoggerAdapter.With(fields), state: q.state}
}
