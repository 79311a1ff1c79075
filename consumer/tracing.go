package consumer

import (
	"context"
	dbsql "database/sql"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/warrenmq/warren/publisher"
)

// TracerName is the instrumentation scope of the consumer's spans.
const TracerName = "github.com/warrenmq/warren/consumer"

// traced wraps h so that each handler run continues the trace of its
// delivery: the W3C trace context is read from the delivery's traceparent
// (and tracestate) header and the run gets a span of kind consumer, named
// "process <queue>" ("prepare <queue>" for a Preparer's Prepare; the HTTP
// sink's POST is its "process" span and carries the trace on), whose
// parent is the span that appended the event. The handler's ctx carries
// it: trace.SpanFromContext(ctx), and events the handler appends to an
// outbox carry the trace on. A delivery without a traceparent starts a
// new trace. The audit-only Inbox has no code of the application's to
// trace and is not wrapped.
func traced(h Handler, tp trace.TracerProvider, consumer string) Handler {
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	t := &tracing{
		tracer: tp.Tracer(TracerName),
		queue:  publisher.QueueName(consumer),
		attrs: []attribute.KeyValue{
			attribute.String("messaging.system", "rabbitmq"),
			attribute.String("messaging.operation.type", "process"),
			attribute.String("messaging.consumer.group.name", consumer),
		},
	}
	_, builtin := h.(builtinHandler)
	p, prepares := h.(Preparer)
	switch {
	case builtin && prepares:
		return tracedBuiltinPreparer{tracedPreparer{tracedHandler{h, t}, p, "process"}}
	case builtin:
		return h
	case prepares:
		return tracedPreparer{tracedHandler{h, t}, p, "prepare"}
	}
	return tracedHandler{h, t}
}

type tracing struct {
	tracer trace.Tracer
	queue  string
	attrs  []attribute.KeyValue
}

// start returns ctx with a span for d's run that continues d's trace.
func (t *tracing) start(ctx context.Context, op string, d *Delivery) (context.Context, trace.Span) {
	ctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier(d.Headers))
	ctx, span := t.tracer.Start(ctx, op+" "+t.queue, trace.WithSpanKind(trace.SpanKindConsumer))
	if span.IsRecording() { // no attributes to build for a provider that records nothing
		span.SetAttributes(t.attrs...)
		span.SetAttributes(
			attribute.String("messaging.operation.name", op),
			attribute.String("messaging.destination.name", d.Exchange),
			attribute.String("messaging.rabbitmq.destination.routing_key", d.RoutingKey),
			attribute.String("messaging.message.id", d.MessageID),
			attribute.Int("warren.attempt", d.Attempt),
		)
	}
	return ctx, span
}

func end(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

type tracedHandler struct {
	h Handler
	t *tracing
}

func (th tracedHandler) Handle(ctx context.Context, tx *dbsql.Tx, d *Delivery) (err error) {
	ctx, span := th.t.start(ctx, "process", d)
	defer func() { end(span, err) }()
	return th.h.Handle(ctx, tx, d)
}

type tracedPreparer struct {
	tracedHandler
	p  Preparer
	op string
}

func (tp tracedPreparer) Prepare(ctx context.Context, d *Delivery) (err error) {
	ctx, span := tp.t.start(ctx, tp.op, d)
	defer func() { end(span, err) }()
	return tp.p.Prepare(ctx, d)
}

// tracedBuiltinPreparer is this package's HTTP sink, traced: only its
// Prepare runs, and its span is the "process" span (the POST carries the
// trace on to the endpoint).
type tracedBuiltinPreparer struct{ tracedPreparer }

func (tracedBuiltinPreparer) builtin() {}
