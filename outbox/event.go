package outbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// DefaultContentType is the content type of an event that names none.
const DefaultContentType = "application/json"

// DefaultMaxPayloadBytes is the largest payload Append accepts by default:
// large messages do not belong on a message bus.
const DefaultMaxPayloadBytes = 1 << 20

// ReservedHeaderPrefix starts metadata keys that warren uses for AMQP
// properties; an event header may not use it.
const ReservedHeaderPrefix = "warren."

// Event is one change an application announces.
type Event struct {
	// ID becomes the AMQP message_id. Default: a new UUIDv7.
	ID string
	// Producer is the application that announces the event; it selects the
	// exchange "<producer>.events". Required; [a-z0-9][a-z0-9-]{0,62}.
	Producer string
	// Type is the event type, e.g. "company.updated": the routing key and
	// the AMQP type. Required.
	Type string
	// AggregateType, AggregateID and AggregateVersion name the entity that
	// changed. Events of one aggregate are published in append order.
	AggregateType string
	AggregateID   string
	// AggregateVersion is optional; nil means none.
	AggregateVersion *int64
	// ContentType of the payload. Default: DefaultContentType.
	ContentType string
	// Headers are sent as AMQP headers with string values.
	Headers map[string]string
	// CorrelationID is sent as the AMQP correlation_id. Optional.
	CorrelationID string
	// Expiration is a per-event TTL (AMQP expiration, whole milliseconds).
	// Zero means none.
	Expiration time.Duration
	// Traceparent is a W3C trace context. Optional.
	Traceparent string
	// Payload is the body, sent unchanged. Required (may be empty JSON like
	// "{}", not nil).
	Payload []byte
}

// Version returns a pointer to v, for Event.AggregateVersion.
func Version(v int64) *int64 { return &v }

// ErrInvalidEvent is wrapped by every validation error.
var ErrInvalidEvent = errors.New("invalid event")

// ErrPayloadTooLarge is wrapped when a payload exceeds the configured limit.
var ErrPayloadTooLarge = errors.New("payload too large")

// ValidationError says which field of an event is wrong and why.
type ValidationError struct {
	Field  string
	Reason string
	cause  error
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("invalid event: %s: %s", e.Field, e.Reason)
}

// Unwrap lets errors.Is match ErrInvalidEvent and ErrPayloadTooLarge.
func (e *ValidationError) Unwrap() []error {
	if e.cause != nil {
		return []error{ErrInvalidEvent, e.cause}
	}
	return []error{ErrInvalidEvent}
}

func invalid(field, format string, args ...any) *ValidationError {
	return &ValidationError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// validName reports whether name is an application name of the contract,
// [a-z0-9][a-z0-9-]{0,62}. The relay checks every row it reads; this is a
// tenth of a regexp's cost.
func validName(name string) bool {
	if len(name) == 0 || len(name) > 63 || name[0] == '-' {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// ValidateProducer checks an application name against the contract.
func ValidateProducer(name string) error {
	if !validName(name) {
		return invalid("producer", "%q is not an application name: use 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit", name)
	}
	return nil
}

// Validate checks e as Append would with the given payload limit (0 means
// DefaultMaxPayloadBytes).
func (e *Event) Validate(maxPayload int) error {
	if maxPayload <= 0 {
		maxPayload = DefaultMaxPayloadBytes
	}
	if e.ID != "" && (strings.TrimSpace(e.ID) != e.ID || !utf8.ValidString(e.ID) || len(e.ID) > 255) {
		return invalid("id", "%q must be printable UTF-8 without surrounding spaces, at most 255 bytes", e.ID)
	}
	if err := ValidateProducer(e.Producer); err != nil {
		return err
	}
	if strings.TrimSpace(e.Type) == "" {
		return invalid("type", "empty: every event needs a type such as \"company.updated\"")
	}
	if len(e.Type) > 255 || !utf8.ValidString(e.Type) {
		return invalid("type", "%q must be UTF-8, at most 255 bytes (it is the routing key)", e.Type)
	}
	if e.Payload == nil {
		return invalid("payload", "nil: an event needs a payload")
	}
	if len(e.Payload) > maxPayload {
		return &ValidationError{Field: "payload", Reason: fmt.Sprintf("%d bytes, more than the limit of %d bytes (large messages do not belong on a bus: store the data and send a reference)", len(e.Payload), maxPayload), cause: ErrPayloadTooLarge}
	}
	for _, f := range [...]struct{ field, v string }{{"content_type", e.ContentType}, {"correlation_id", e.CorrelationID}, {"aggregate_type", e.AggregateType}, {"traceparent", e.Traceparent}} {
		if len(f.v) > 255 || !utf8.ValidString(f.v) {
			return invalid(f.field, "must be UTF-8, at most 255 bytes (an AMQP short string)")
		}
	}
	if e.Expiration < 0 {
		return invalid("expiration", "negative (%s)", e.Expiration)
	}
	if e.Expiration > 0 && e.Expiration < time.Millisecond {
		return invalid("expiration", "%s is less than a millisecond", e.Expiration)
	}
	for k, v := range e.Headers {
		if err := validateHeader(k, v); err != nil {
			return err
		}
	}
	return nil
}

// reservedHeaders are set by warren from the event's fields.
var reservedHeaders = map[string]string{
	"aggregate-type":    "AggregateType",
	"aggregate-id":      "AggregateID",
	"aggregate-version": "AggregateVersion",
	"traceparent":       "Traceparent",
}

func validateHeader(k, v string) error {
	switch {
	case k == "":
		return invalid("headers", "empty header name")
	case strings.HasPrefix(k, ReservedHeaderPrefix):
		return invalid("headers", "%q: the prefix %q is reserved", k, ReservedHeaderPrefix)
	case strings.HasPrefix(k, "x-"):
		return invalid("headers", "%q: names starting with \"x-\" belong to RabbitMQ", k)
	case strings.HasPrefix(k, "warren-"):
		return invalid("headers", "%q: names starting with \"warren-\" are warren's own", k)
	case reservedHeaders[k] != "":
		return invalid("headers", "%q: set Event.%s instead", k, reservedHeaders[k])
	case len(k) > 255 || !utf8.ValidString(k):
		return invalid("headers", "%q: a header name must be UTF-8, at most 255 bytes", k)
	case !utf8.ValidString(v):
		return invalid("headers", "%q: the value is not UTF-8", k)
	}
	return nil
}

// ParseHeaders decodes the headers column: a JSON object whose values are all
// strings. Anything else (numbers, nesting, not JSON) is an error that says
// what is wrong. No headers ("{}" or nothing) give a nil map.
func ParseHeaders(raw string) (map[string]string, error) {
	if raw == "{}" || strings.TrimSpace(raw) == "" {
		return nil, nil // most rows: no JSON to decode, no map to make
	}
	var generic map[string]json.RawMessage
	if err := json.Unmarshal([]byte(raw), &generic); err != nil {
		return nil, invalid("headers", "not a JSON object of strings: %v", err)
	}
	out := make(map[string]string, len(generic))
	for k, v := range generic {
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return nil, invalid("headers", "value of %q is %s, not a string", k, jsonKind(v))
		}
		if err := validateHeader(k, s); err != nil {
			return nil, err
		}
		out[k] = s
	}
	return out, nil
}

func jsonKind(v json.RawMessage) string {
	s := strings.TrimSpace(string(v))
	switch {
	case s == "null":
		return "null"
	case s == "true" || s == "false":
		return "a boolean"
	case strings.HasPrefix(s, "{"):
		return "an object"
	case strings.HasPrefix(s, "["):
		return "an array"
	default:
		if _, err := strconv.ParseFloat(s, 64); err == nil {
			return "a number"
		}
		return "not a string"
	}
}

func encodeHeaders(h map[string]string) (string, error) {
	if len(h) == 0 {
		return "{}", nil
	}
	b, err := json.Marshal(h)
	if err != nil {
		return "", fmt.Errorf("encode headers: %w", err)
	}
	return string(b), nil
}
