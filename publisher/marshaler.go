package publisher

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp "github.com/rabbitmq/amqp091-go"
)

// Metadata keys that carry AMQP properties and delivery facts on a Watermill
// message. Every metadata key that does not start with MetaPrefix is an AMQP
// header with a string value.
const (
	MetaPrefix          = "warren."
	MetaExchange        = "warren.exchange"    // delivery: the exchange it was published to
	MetaRoutingKey      = "warren.routing_key" // publish: the routing key; delivery: the one received
	MetaType            = "warren.type"
	MetaAppID           = "warren.app_id"
	MetaContentType     = "warren.content_type"
	MetaContentEncoding = "warren.content_encoding"
	MetaCorrelationID   = "warren.correlation_id"
	MetaReplyTo         = "warren.reply_to"
	MetaExpiration      = "warren.expiration" // milliseconds, as AMQP has it
	MetaTimestamp       = "warren.timestamp"  // RFC 3339
	MetaPriority        = "warren.priority"
	MetaUserID          = "warren.user_id"
	MetaDeliveryMode    = "warren.delivery_mode"
	MetaDeliveryTag     = "warren.delivery_tag" // delivery only
	MetaRedelivered     = "warren.redelivered"  // delivery only: "true" or "false"
	// MetaMalformed is set by Unmarshal, with the reason, on a delivery that
	// cannot be processed (no message_id, say). Unmarshal never fails:
	// watermill-amqp's subscriber would requeue a delivery it cannot
	// unmarshal forever, blocking the queue.
	MetaMalformed = "warren.malformed"
)

// Header names fixed by the contract.
const (
	HeaderAggregateType    = "aggregate-type"
	HeaderAggregateID      = "aggregate-id"
	HeaderAggregateVersion = "aggregate-version"
	HeaderTraceparent      = "traceparent"
	HeaderAttempt          = "warren-attempt"
	HeaderError            = "warren-error"
	HeaderFirstFailedAt    = "warren-first-failed-at"
	HeaderPoisonReason     = "warren-poison-reason"
	HeaderOriginalExchange = "warren-original-exchange"
	HeaderOriginalRouting  = "warren-original-routing-key"
	HeaderDeliveryCount    = "x-delivery-count"
	HeaderDeath            = "x-death"
)

// integerHeaders are sent as AMQP integers, not strings, so that consumers in
// other languages read numbers.
var integerHeaders = map[string]bool{HeaderAggregateVersion: true, HeaderAttempt: true}

// brokerHeaders are owned by RabbitMQ; they are never published back.
func brokerHeader(k string) bool {
	return k == HeaderDeath || k == HeaderDeliveryCount || strings.HasPrefix(k, "x-first-death-") || strings.HasPrefix(k, "x-last-death-")
}

// Marshaler maps a Watermill message to an AMQP publishing and a delivery
// back, per the contract: the message UUID is message_id, MetaXxx keys are
// properties, other metadata are headers. Unlike watermill-amqp's
// DefaultMarshaler it accepts the non-string headers RabbitMQ adds
// (x-death, x-delivery-count) and never fails to unmarshal.
type Marshaler struct{}

var _ wamqp.Marshaler = Marshaler{}

// Marshal builds a persistent publishing from msg.
func (Marshaler) Marshal(msg *message.Message) (amqp.Publishing, error) {
	if msg.UUID == "" {
		return amqp.Publishing{}, fmt.Errorf("marshal: message has no id (message_id is required)")
	}
	p := amqp.Publishing{
		MessageId:    msg.UUID,
		DeliveryMode: amqp.Persistent,
		Body:         msg.Payload,
	}
	headers := amqp.Table{}
	for k, v := range msg.Metadata {
		switch k {
		case MetaType:
			p.Type = v
		case MetaAppID:
			p.AppId = v
		case MetaContentType:
			p.ContentType = v
		case MetaContentEncoding:
			p.ContentEncoding = v
		case MetaCorrelationID:
			p.CorrelationId = v
		case MetaReplyTo:
			p.ReplyTo = v
		case MetaExpiration:
			p.Expiration = v
		case MetaUserID:
			p.UserId = v
		case MetaTimestamp:
			if v == "" {
				continue
			}
			t, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				return amqp.Publishing{}, fmt.Errorf("marshal %s: %s: %w", msg.UUID, MetaTimestamp, err)
			}
			p.Timestamp = t.UTC()
		case MetaPriority:
			if v == "" {
				continue
			}
			n, err := strconv.ParseUint(v, 10, 8)
			if err != nil {
				return amqp.Publishing{}, fmt.Errorf("marshal %s: %s: %w", msg.UUID, MetaPriority, err)
			}
			p.Priority = uint8(n)
		default:
			if strings.HasPrefix(k, MetaPrefix) || brokerHeader(k) {
				continue // delivery facts and broker-owned headers are not published
			}
			if integerHeaders[k] {
				if n, err := strconv.ParseInt(v, 10, 64); err == nil {
					headers[k] = n
					continue
				}
			}
			headers[k] = v
		}
	}
	if len(headers) > 0 {
		p.Headers = headers
	}
	return p, nil
}

// ErrNoDelivery is returned by Unmarshal for the zero amqp.Delivery, which
// is what a closed delivery channel yields (the broker cancelled the
// consumer, for instance because its queue was deleted). watermill-amqp's
// subscriber reads such zero values in a loop; failing them makes it stop
// and subscribe again instead of parking empty "messages" as malformed.
var ErrNoDelivery = errors.New("not a delivery: the delivery channel was closed")

// Unmarshal turns a delivery into a message. A real delivery never fails:
// one that cannot be processed gets MetaMalformed with the reason. Only the
// zero delivery of a closed channel is refused (ErrNoDelivery).
func (Marshaler) Unmarshal(d amqp.Delivery) (*message.Message, error) {
	if d.Acknowledger == nil && d.DeliveryTag == 0 {
		return nil, ErrNoDelivery
	}
	msg := message.NewMessage(d.MessageId, d.Body)
	md := msg.Metadata
	set := func(k, v string) {
		if v != "" {
			md.Set(k, v)
		}
	}
	set(MetaExchange, d.Exchange)
	set(MetaRoutingKey, d.RoutingKey)
	set(MetaType, d.Type)
	set(MetaAppID, d.AppId)
	set(MetaContentType, d.ContentType)
	set(MetaContentEncoding, d.ContentEncoding)
	set(MetaCorrelationID, d.CorrelationId)
	set(MetaReplyTo, d.ReplyTo)
	set(MetaExpiration, d.Expiration)
	set(MetaUserID, d.UserId)
	if !d.Timestamp.IsZero() {
		md.Set(MetaTimestamp, d.Timestamp.UTC().Format(time.RFC3339))
	}
	if d.Priority != 0 {
		md.Set(MetaPriority, strconv.Itoa(int(d.Priority)))
	}
	md.Set(MetaDeliveryMode, strconv.Itoa(int(d.DeliveryMode)))
	md.Set(MetaDeliveryTag, strconv.FormatUint(d.DeliveryTag, 10))
	md.Set(MetaRedelivered, strconv.FormatBool(d.Redelivered))

	id, malformed := Inspect(d)
	msg.UUID = id
	for k, v := range d.Headers {
		if !strings.HasPrefix(k, MetaPrefix) {
			md.Set(k, HeaderString(v))
		}
	}
	if malformed != "" {
		md.Set(MetaMalformed, malformed)
	}
	return msg, nil
}

// Inspect returns a delivery's message id, made valid UTF-8, and why the
// delivery cannot be processed ("malformed: ..."), or "" when it can: no
// message id, an id that is not UTF-8, or a header with the reserved
// MetaPrefix. Unmarshal sets the reason as MetaMalformed.
func Inspect(d amqp.Delivery) (id, malformed string) {
	id = d.MessageId
	var reasons []string
	if strings.TrimSpace(d.MessageId) == "" {
		reasons = append(reasons, "no message_id")
	} else if !utf8.ValidString(d.MessageId) {
		reasons = append(reasons, "message_id is not UTF-8")
		id = strings.ToValidUTF8(d.MessageId, "\uFFFD")
	}
	for k := range d.Headers {
		if strings.HasPrefix(k, MetaPrefix) {
			reasons = append(reasons, fmt.Sprintf("header %q uses the reserved prefix %q", k, MetaPrefix))
		}
	}
	if len(reasons) == 0 {
		return id, ""
	}
	return id, "malformed: " + strings.Join(reasons, "; ")
}

// HeaderString renders an AMQP header value as the string warren keeps:
// strings as they are, numbers in decimal, times in RFC 3339, bytes in
// base64, tables and arrays as JSON.
func HeaderString(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	case []byte:
		return base64.StdEncoding.EncodeToString(x)
	case bool:
		return strconv.FormatBool(x)
	case int8, int16, int32, int64, int, uint8, uint16, uint32, uint64, uint:
		return fmt.Sprint(x)
	case float32:
		return strconv.FormatFloat(float64(x), 'g', -1, 32)
	case float64:
		return strconv.FormatFloat(x, 'g', -1, 64)
	case amqp.Decimal:
		return fmt.Sprintf("%de-%d", x.Value, x.Scale)
	case time.Time:
		return x.UTC().Format(time.RFC3339)
	default:
		b, err := json.Marshal(jsonable(v))
		if err != nil {
			return fmt.Sprint(v)
		}
		return string(b)
	}
}

func jsonable(v any) any {
	switch x := v.(type) {
	case amqp.Table:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[k] = jsonable(e)
		}
		return m
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = jsonable(e)
		}
		return out
	case []byte:
		return base64.StdEncoding.EncodeToString(x)
	case time.Time:
		return x.UTC().Format(time.RFC3339)
	case amqp.Decimal:
		return fmt.Sprintf("%de-%d", x.Value, x.Scale)
	default:
		return v
	}
}

// DeliveryCount returns how often RabbitMQ has delivered a message before,
// from the quorum queue header x-delivery-count (0 when absent).
func DeliveryCount(d amqp.Delivery) int64 {
	return headerInt(d.Headers[HeaderDeliveryCount])
}

// Attempt returns the warren-attempt header of a delivery (0 when absent).
func Attempt(headers amqp.Table) int64 { return headerInt(headers[HeaderAttempt]) }

func headerInt(v any) int64 {
	switch x := v.(type) {
	case int8:
		return int64(x)
	case int16:
		return int64(x)
	case int32:
		return int64(x)
	case int64:
		return x
	case int:
		return int64(x)
	case uint8:
		return int64(x)
	case uint16:
		return int64(x)
	case uint32:
		return int64(x)
	case uint64:
		return int64(x)
	case string:
		n, _ := strconv.ParseInt(x, 10, 64)
		return n
	}
	return 0
}
