package inbox

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"unicode/utf8"
)

// Properties are a delivery's AMQP properties with the names of the
// contract's "delivery as JSON". Timestamp is in Unix seconds (AMQP's
// resolution), 0 when absent.
type Properties struct {
	AppID           string `json:"appId"`
	ContentType     string `json:"contentType"`
	ContentEncoding string `json:"contentEncoding"`
	CorrelationID   string `json:"correlationId"`
	DeliveryMode    uint8  `json:"deliveryMode"`
	Expiration      string `json:"expiration"`
	MessageID       string `json:"messageId"`
	Priority        uint8  `json:"priority"`
	ReplyTo         string `json:"replyTo"`
	Type            string `json:"type"`
	UserID          string `json:"userId"`
	Timestamp       int64  `json:"timestamp"`
}

// Envelope is where a delivery came from, in the contract's JSON names.
type Envelope struct {
	DeliveryTag uint64 `json:"deliveryTag"`
	Exchange    string `json:"exchange"`
	RoutingKey  string `json:"routingKey"`
	Redelivered bool   `json:"redelivered"`
}

// DeliveryJSON is the contract's "delivery as JSON", printed by `warren
// inbox show` and POSTed by the HTTP sink.
type DeliveryJSON struct {
	// Body is the payload as text, or in standard base64 when it is not
	// valid UTF-8 or binary output was asked for.
	Body       string            `json:"body"`
	Properties Properties        `json:"properties"`
	Headers    map[string]string `json:"headers"`
	Envelope   Envelope          `json:"envelope"`
}

// BodyIsText reports whether body is printed as text (valid UTF-8 and binary
// not asked for) rather than base64.
func BodyIsText(body []byte, binary bool) bool {
	return !binary && utf8.Valid(body)
}

// JSON returns d in the contract's JSON shape. The body is text, or base64
// when it is not valid UTF-8 or binary is set. An Entry read back from the
// inbox has no delivery tag and redelivered false.
func JSON(d *Delivery, binary bool) DeliveryJSON {
	out := DeliveryJSON{
		Properties: d.Properties(),
		Headers:    d.Headers,
		Envelope: Envelope{
			DeliveryTag: d.DeliveryTag,
			Exchange:    d.Exchange,
			RoutingKey:  d.RoutingKey,
			Redelivered: d.Redelivered,
		},
	}
	if out.Headers == nil {
		out.Headers = map[string]string{}
	}
	if BodyIsText(d.Body, binary) {
		out.Body = string(d.Body)
	} else {
		out.Body = base64.StdEncoding.EncodeToString(d.Body)
	}
	return out
}

// ToJSON encodes d in the contract's JSON shape (see JSON), on one line,
// without escaping <, > and & (the body reads as it was sent).
func ToJSON(d *Delivery, binary bool) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(JSON(d, binary)); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}
