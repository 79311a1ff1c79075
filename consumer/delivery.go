package consumer

import (
	"encoding/json"
	"mime"
	"strconv"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
)

// Delivery is what a handler gets: the delivery as the inbox records it
// (message id, event type, producer, headers, body, ...) and the attempt.
type Delivery struct {
	inbox.Delivery
	// Attempt is the number of this handler run, 1 for the first. Runs in
	// process and trips through retry queues count, and so do runs that a
	// crash or a lost connection cut short once the inbox saw them start
	// (on a redelivery) or fail; a delivery that was only prefetched when
	// the consumer stopped does not.
	Attempt int
	// FirstFailedAt is when a handler run of this message first failed;
	// zero on a first attempt.
	FirstFailedAt time.Time

	binary bool
	msg    *message.Message // the Router's message, nil outside the consumer
	raw    *amqp.Delivery   // the delivery as received
	trips  int              // warren-attempt as carried by this copy
	// arrivedAt is when it entered the consumer's queue (AMQP timestamp,
	// or x-death time when it came back from a retry queue); may be zero.
	arrivedAt time.Time
}

// JSON returns the delivery in the contract's JSON shape, with the
// consumer's Binary setting.
func (d *Delivery) JSON() ([]byte, error) { return inbox.ToJSON(&d.Delivery, d.binary) }

// Kinds of poison reasons, as the Poisoned hook and the metric label see
// them; the warren-poison-reason header carries the detail after "malformed: ".
const (
	ReasonMaxAttempts = "max-attempts"
	ReasonMalformed   = "malformed"
	ReasonTooLarge    = "too-large"
	ReasonExpired     = "expired"
	ReasonAutoAck     = "auto-ack"
)

// parse turns a delivery handed out by the subscriber into a Delivery and
// returns the poison reason when the delivery cannot be handled
// (malformed, too large).
func (c *Consumer) parse(msg *message.Message, now time.Time) (*Delivery, string) {
	raw := rawDelivery(msg)
	id, malformed := publisher.Inspect(*raw)
	d := toDelivery(c.cfg.Consumer, raw, id, now)
	d.msg = msg
	d.binary = c.cfg.Binary
	if malformed != "" {
		return d, malformed
	}
	if c.cfg.MaxBodyBytes >= 0 && len(d.Body) > c.cfg.MaxBodyBytes {
		return d, ReasonTooLarge
	}
	if isJSON(d.ContentType) && !json.Valid(d.Body) {
		return d, ReasonMalformed + ": the body is not valid JSON (content type " + d.ContentType + ")"
	}
	return d, ""
}

// rawDelivery returns the AMQP delivery behind a message the subscriber
// handed out.
func rawDelivery(msg *message.Message) *amqp.Delivery {
	if h, ok := msg.Context().Value(handoutKey{}).(*handout); ok && h.raw != nil {
		return h.raw
	}
	// Not the subscriber's (cannot happen): a delivery with the message's
	// id and body, which parse finds malformed only if they are.
	return &amqp.Delivery{MessageId: msg.UUID, Body: msg.Payload}
}

// toDelivery reads an AMQP delivery as publisher.Marshaler.Unmarshal
// would, without the round trip through Watermill metadata strings: id
// is the message id as publisher.Inspect made it valid; headers with the
// reserved prefix are left out (Inspect reports them).
func toDelivery(consumer string, raw *amqp.Delivery, id string, now time.Time) *Delivery {
	d := &Delivery{
		Delivery: inbox.Delivery{
			Consumer:        consumer,
			MessageID:       id,
			Producer:        raw.AppId,
			Exchange:        raw.Exchange,
			RoutingKey:      raw.RoutingKey,
			EventType:       raw.Type,
			ContentType:     raw.ContentType,
			ContentEncoding: raw.ContentEncoding,
			CorrelationID:   raw.CorrelationId,
			ReplyTo:         raw.ReplyTo,
			Expiration:      raw.Expiration,
			UserID:          raw.UserId,
			DeliveryMode:    raw.DeliveryMode,
			Priority:        raw.Priority,
			DeliveryTag:     raw.DeliveryTag,
			Body:            raw.Body,
			ReceivedAt:      now,
			Redelivered:     raw.Redelivered,
		},
		raw: raw,
	}
	if !raw.Timestamp.IsZero() {
		// AMQP timestamps have a resolution of one second.
		d.Timestamp = raw.Timestamp.UTC().Truncate(time.Second)
	}
	headers := make(map[string]string, len(raw.Headers))
	for k, v := range raw.Headers {
		if !strings.HasPrefix(k, publisher.MetaPrefix) {
			headers[k] = publisher.HeaderString(v)
		}
	}
	d.Headers = headers
	d.AggregateType = headers[publisher.HeaderAggregateType]
	d.AggregateID = headers[publisher.HeaderAggregateID]
	if s := headers[publisher.HeaderAggregateVersion]; s != "" {
		if v, err := strconv.ParseInt(s, 10, 64); err == nil {
			d.AggregateVersion = &v
		}
	}
	// A retry or a redriven message comes back through the default
	// exchange: report where it came from first.
	if ex, ok := headers[publisher.HeaderOriginalExchange]; ok && d.Exchange == "" {
		d.Exchange, d.RoutingKey = ex, headers[publisher.HeaderOriginalRouting]
	}
	d.trips = atoi(headers[publisher.HeaderAttempt])
	if s := headers[publisher.HeaderFirstFailedAt]; s != "" {
		if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
			d.FirstFailedAt = t
		}
	}
	d.arrivedAt = d.Timestamp
	if t := deathTime(headers[publisher.HeaderDeath]); !t.IsZero() {
		d.arrivedAt = t
	}
	return d
}

// redelivered reports whether the broker delivered this copy before
// (without an ack): after a crash, a lost connection or a stop.
func (d *Delivery) redelivered() bool {
	return d.Redelivered || atoi(d.Headers[publisher.HeaderDeliveryCount]) > 0
}

// deathTime returns the time of the first (latest) x-death entry, as
// publisher.HeaderString renders the header (a JSON array of tables).
func deathTime(xdeath string) time.Time {
	if xdeath == "" {
		return time.Time{}
	}
	var deaths []struct {
		Time string `json:"time"`
	}
	if json.Unmarshal([]byte(xdeath), &deaths) != nil || len(deaths) == 0 {
		return time.Time{}
	}
	t, _ := time.Parse(time.RFC3339Nano, deaths[0].Time)
	return t
}

// isJSON reports whether a content type is JSON: application/json or a
// +json suffix.
func isJSON(contentType string) bool {
	if contentType == "" {
		return false
	}
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	return mt == "application/json" || strings.HasSuffix(mt, "+json")
}

func atoi(s string) int {
	if s == "" {
		return 0
	}
	n, _ := strconv.Atoi(s)
	return n
}

// reasonKind is the kind of a poison reason: "malformed: no message_id" is
// malformed.
func reasonKind(reason string) string {
	kind, _, _ := strings.Cut(reason, ":")
	return kind
}
