package consumer

import (
	"encoding/json"
	"mime"
	"strconv"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

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
	msg    *message.Message
	trips  int // warren-attempt as carried by this copy
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

// parse turns a Watermill message made by publisher.Marshaler into a
// Delivery and returns the poison reason when the delivery cannot be
// handled (malformed, too large).
func (c *Consumer) parse(msg *message.Message, now time.Time) (*Delivery, string) {
	d := toDelivery(c.cfg.Consumer, msg, now)
	d.binary = c.cfg.Binary
	if reason := msg.Metadata.Get(publisher.MetaMalformed); reason != "" {
		return d, reason
	}
	if c.cfg.MaxBodyBytes >= 0 && len(d.Body) > c.cfg.MaxBodyBytes {
		return d, ReasonTooLarge
	}
	if isJSON(d.ContentType) && !json.Valid(d.Body) {
		return d, ReasonMalformed + ": the body is not valid JSON (content type " + d.ContentType + ")"
	}
	return d, ""
}

// toDelivery reads a Watermill message made by publisher.Marshaler.
func toDelivery(consumer string, msg *message.Message, now time.Time) *Delivery {
	md := msg.Metadata
	d := &Delivery{
		Delivery: inbox.Delivery{
			Consumer:        consumer,
			MessageID:       msg.UUID,
			Producer:        md.Get(publisher.MetaAppID),
			Exchange:        md.Get(publisher.MetaExchange),
			RoutingKey:      md.Get(publisher.MetaRoutingKey),
			EventType:       md.Get(publisher.MetaType),
			ContentType:     md.Get(publisher.MetaContentType),
			ContentEncoding: md.Get(publisher.MetaContentEncoding),
			CorrelationID:   md.Get(publisher.MetaCorrelationID),
			ReplyTo:         md.Get(publisher.MetaReplyTo),
			Expiration:      md.Get(publisher.MetaExpiration),
			UserID:          md.Get(publisher.MetaUserID),
			Body:            msg.Payload,
			ReceivedAt:      now,
			Redelivered:     md.Get(publisher.MetaRedelivered) == "true",
		},
		msg: msg,
	}
	d.DeliveryMode = uint8(atoi(md.Get(publisher.MetaDeliveryMode)))
	d.Priority = uint8(atoi(md.Get(publisher.MetaPriority)))
	d.DeliveryTag, _ = strconv.ParseUint(md.Get(publisher.MetaDeliveryTag), 10, 64)
	if ts := md.Get(publisher.MetaTimestamp); ts != "" {
		d.Timestamp, _ = time.Parse(time.RFC3339Nano, ts)
	}
	headers := make(map[string]string, len(md))
	for k, v := range md {
		if !strings.HasPrefix(k, publisher.MetaPrefix) {
			headers[k] = v
		}
	}
	d.Headers = headers
	d.AggregateType = headers[publisher.HeaderAggregateType]
	d.AggregateID = headers[publisher.HeaderAggregateID]
	if v, err := strconv.ParseInt(headers[publisher.HeaderAggregateVersion], 10, 64); err == nil {
		d.AggregateVersion = &v
	}
	// A retry or a redriven message comes back through the default
	// exchange: report where it came from first.
	if ex, ok := headers[publisher.HeaderOriginalExchange]; ok && d.Exchange == "" {
		d.Exchange, d.RoutingKey = ex, headers[publisher.HeaderOriginalRouting]
	}
	d.trips = atoi(headers[publisher.HeaderAttempt])
	if t, err := time.Parse(time.RFC3339Nano, headers[publisher.HeaderFirstFailedAt]); err == nil {
		d.FirstFailedAt = t
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
	n, _ := strconv.Atoi(s)
	return n
}

// reasonKind is the kind of a poison reason: "malformed: no message_id" is
// malformed.
func reasonKind(reason string) string {
	kind, _, _ := strings.Cut(reason, ":")
	return kind
}
