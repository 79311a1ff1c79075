package publisher_test

import (
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/warrenmq/warren/publisher"
)

// headerTable builds an AMQP header table from fuzz bytes: every kind of
// value RabbitMQ can send (integers of each width, floats, decimals,
// times, byte arrays, nested tables and arrays such as x-death).
func headerTable(b []byte, depth int) amqp.Table {
	t := amqp.Table{}
	for i := 0; i+1 < len(b) && len(t) < 16; i += 2 {
		key := string(b[i : i+1+int(b[i+1])%3])
		t[key] = headerValue(b[i:], depth)
	}
	return t
}

func headerValue(b []byte, depth int) any {
	if len(b) == 0 {
		return nil
	}
	rest := b[1:]
	switch b[0] % 14 {
	case 0:
		return string(rest)
	case 1:
		return int8(len(rest))
	case 2:
		return int16(-len(rest))
	case 3:
		return int32(len(rest) * 1000)
	case 4:
		return int64(-1) << (len(rest) % 63)
	case 5:
		return float32(len(rest)) / 3
	case 6:
		return float64(len(rest)) / 7
	case 7:
		return amqp.Decimal{Scale: uint8(len(rest) % 5), Value: int32(len(rest))}
	case 8:
		return time.Unix(int64(len(rest))*1000, 0)
	case 9:
		return rest
	case 10:
		return len(rest)%2 == 0
	case 11:
		if depth > 2 {
			return nil
		}
		return headerTable(rest, depth+1)
	case 12:
		if depth > 2 {
			return nil
		}
		return []any{headerValue(rest, depth+1), headerTable(rest, depth+1)}
	default:
		return uint8(len(rest))
	}
}

// FuzzUnmarshal feeds the consumer's decoding every shape of delivery
// RabbitMQ can send: it never panics or fails, marks a delivery without a
// usable message_id malformed, and what it decodes publishes again as a
// valid AMQP table.
func FuzzUnmarshal(f *testing.F) {
	f.Add("0190c6f4-0000-7000-8000-000000000000", []byte(`{"a":1}`), []byte("x-death\x0bcount\x04"), "application/json", "company.updated")
	f.Add("", []byte{0xff, 0xfe}, []byte{}, "", "")
	f.Add("id\xff", []byte("not json"), []byte("\x0c\x01\x0b\x02\x07"), "text/plain", "t")
	f.Add("id", []byte(nil), []byte("warren.type\x00"), "application/octet-stream", "")
	f.Fuzz(func(t *testing.T, id string, body, headers []byte, contentType, typ string) {
		d := amqp.Delivery{
			MessageId: id, Body: body, ContentType: contentType, Type: typ,
			Headers: headerTable(headers, 0), Exchange: "crm.events", RoutingKey: typ, DeliveryTag: 7,
			Timestamp: time.Unix(1700000000, 0),
		}
		msg, err := publisher.Marshaler{}.Unmarshal(d)
		if err != nil {
			t.Fatalf("Unmarshal failed: %v", err)
		}
		malformed := msg.Metadata.Get(publisher.MetaMalformed)
		if strings.TrimSpace(id) == "" && malformed == "" {
			t.Fatalf("a delivery without message_id is not marked malformed")
		}
		if malformed != "" && !strings.HasPrefix(malformed, "malformed: ") {
			t.Fatalf("malformed reason %q lacks the contract's prefix", malformed)
		}
		for k := range d.Headers {
			if !strings.HasPrefix(k, publisher.MetaPrefix) {
				if _, ok := msg.Metadata[k]; !ok {
					t.Fatalf("header %q lost", k)
				}
			}
		}
		if malformed != "" || !utf8.ValidString(msg.UUID) {
			return
		}
		// What was decoded can be published again (a retry does so).
		p, err := publisher.Marshaler{}.Marshal(msg)
		if err != nil {
			t.Fatalf("Marshal after Unmarshal: %v", err)
		}
		if err := p.Headers.Validate(); err != nil {
			t.Fatalf("republished headers are not a valid AMQP table: %v", err)
		}
		for k := range p.Headers {
			if k == publisher.HeaderDeath || k == publisher.HeaderDeliveryCount {
				t.Fatalf("broker-owned header %q published back", k)
			}
		}
	})
}

func TestUnmarshalRefusesTheZeroDeliveryOfAClosedChannel(t *testing.T) {
	_, err := publisher.Marshaler{}.Unmarshal(amqp.Delivery{})
	if !errors.Is(err, publisher.ErrNoDelivery) {
		t.Fatalf("zero delivery: got %v, want ErrNoDelivery", err)
	}
}
