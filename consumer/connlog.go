package consumer

import (
	"log/slog"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
)

// Intervals of connLogger.
const (
	// connRetryLogInterval is the least time between two lines saying the
	// subscription still cannot reconnect.
	connRetryLogInterval = time.Minute
	// connErrorLogInterval is the least time between two lines of the same
	// other Watermill error; the held back ones are counted.
	connErrorLogInterval = 10 * time.Second
)

// Watermill-amqp's log lines about the subscription's connection.
const (
	wmLost         = "Received close notification from AMQP, reconnecting"
	wmChannelGone  = "Channel closed, stopping ProcessMessages"
	wmPrepareError = "Failed to prepare consume"
	wmRetry        = "Cannot reconnect to AMQP, retrying"
	wmConnected    = "Connected to AMQP"
)

// connLogger turns watermill-amqp's lines about the subscription's
// connection into one line per state change, like the publisher's: lost
// (once, not once per subscription), cannot reconnect (then at most once a
// minute, with how long), reconnected (with after how long). Watermill's
// other errors pass through, each message at most once per
// connErrorLogInterval with the number held back.
type connLogger struct {
	watermill.LoggerAdapter
	log *slog.Logger
	url string // redacted
	st  *connState
}

type connState struct {
	mu        sync.Mutex
	lostSince time.Time // zero while connected
	retryLog  time.Time // the last "cannot reconnect" line
	errLast   map[string]time.Time
	errHeld   map[string]int
}

func newConnLogger(next watermill.LoggerAdapter, log *slog.Logger, url string) watermill.LoggerAdapter {
	return &connLogger{LoggerAdapter: next, log: log, url: url,
		st: &connState{errLast: map[string]time.Time{}, errHeld: map[string]int{}}}
}

func (l *connLogger) Error(msg string, err error, fields watermill.LogFields) {
	if err != nil {
		// watermill-amqp's errors carry a stack (pkg/errors), which a
		// text log prints with %+v: keep the message.
		err = plainError(err.Error())
	}
	s := l.st
	now := time.Now()
	s.mu.Lock()
	switch msg {
	case wmLost:
		first := s.lostSince.IsZero()
		if first {
			s.lostSince, s.retryLog = now, time.Time{}
		}
		s.mu.Unlock()
		if first {
			l.log.Warn("subscription lost its connection to the broker, reconnecting", "url", l.url, "error", err)
		}
		return
	case wmChannelGone:
		// One per subscription, when the connection is lost (the lost
		// line says it, and may come a moment later) or the broker closed
		// the channel: the subscription opens another, and says so if
		// that fails.
		s.mu.Unlock()
		l.LoggerAdapter.Debug(msg, fields)
		return
	case wmPrepareError:
		lost := !s.lostSince.IsZero()
		s.mu.Unlock()
		if lost { // one per subscription: the lost line says it
			l.LoggerAdapter.Debug(msg, fields.Add(watermill.LogFields{"error": err}))
			return
		}
	case wmRetry:
		since, last := s.lostSince, s.retryLog
		if since.IsZero() {
			since = now
		}
		log := last.IsZero() || now.Sub(last) >= connRetryLogInterval
		if log {
			s.retryLog = now
		}
		s.mu.Unlock()
		switch {
		case !log:
		case last.IsZero():
			l.log.Warn("subscription cannot reconnect to the broker, retrying with backoff", "url", l.url, "error", err)
		default:
			l.log.Warn("subscription still cannot reconnect to the broker, retrying", "url", l.url,
				"for", now.Sub(since).Round(time.Second), "error", err)
		}
		return
	default:
		s.mu.Unlock()
	}
	// Any other error: the same message at most once per interval.
	s.mu.Lock()
	if now.Sub(s.errLast[msg]) < connErrorLogInterval {
		s.errHeld[msg]++
		s.mu.Unlock()
		return
	}
	held := s.errHeld[msg]
	s.errLast[msg], s.errHeld[msg] = now, 0
	s.mu.Unlock()
	if held > 0 {
		fields = fields.Add(watermill.LogFields{"similar_errors_not_logged": held})
	}
	l.LoggerAdapter.Error(msg, err, fields)
}

func (l *connLogger) Info(msg string, fields watermill.LogFields) {
	if msg == wmConnected {
		s := l.st
		s.mu.Lock()
		since := s.lostSince
		s.lostSince = time.Time{}
		s.mu.Unlock()
		if !since.IsZero() {
			l.log.Info("subscription reconnected to the broker; deliveries resume", "url", l.url,
				"after", time.Since(since).Round(time.Millisecond))
			return
		}
	}
	l.LoggerAdapter.Info(msg, fields)
}

func (l *connLogger) With(fields watermill.LogFields) watermill.LoggerAdapter {
	return &connLogger{LoggerAdapter: l.LoggerAdapter.With(fields), log: l.log, url: l.url, st: l.st}
}

// plainError is an error that prints its message and nothing else.
type plainError string

func (e plainError) Error() string { return string(e) }
