package consumer

import (
	"context"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill"
)

// watermillLogger gives Watermill the consumer's logger: its errors stay
// errors (but for the router's line about a requeue, which the consumer
// logs itself), its info lines (a few per subscription at start and stop) become
// debug lines, and its per-message trace lines cost nothing unless the
// trace level is on.
type watermillLogger struct{ l *slog.Logger }

var _ watermill.LoggerAdapter = watermillLogger{}

func (w watermillLogger) log(level slog.Level, msg string, fields watermill.LogFields, extra ...any) {
	if !w.l.Enabled(context.Background(), level) {
		return
	}
	args := make([]any, 0, 2*len(fields)+len(extra))
	for k, v := range fields {
		args = append(args, k, v)
	}
	w.l.Log(context.Background(), level, msg, append(args, extra...)...)
}

func (w watermillLogger) Error(msg string, err error, fields watermill.LogFields) {
	level := slog.LevelError
	if msg == "Handler returned error" {
		level = slog.LevelDebug // a requeue, which the consumer logged with its reason
	}
	w.log(level, msg, fields, "error", err)
}
func (w watermillLogger) Info(msg string, fields watermill.LogFields) {
	w.log(slog.LevelDebug, msg, fields)
}
func (w watermillLogger) Debug(msg string, fields watermill.LogFields) {
	w.log(slog.LevelDebug, msg, fields)
}
func (w watermillLogger) Trace(msg string, fields watermill.LogFields) {
	w.log(watermill.LevelTrace, msg, fields)
}

func (w watermillLogger) With(fields watermill.LogFields) watermill.LoggerAdapter {
	args := make([]any, 0, 2*len(fields))
	for k, v := range fields {
		args = append(args, k, v)
	}
	return watermillLogger{w.l.With(args...)}
}
