package consumer

import (
	"strconv"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/inbox"
	"github.com/warrenmq/warren/publisher"
)

// The consumer reads each AMQP delivery straight into a Delivery
// (toDelivery) instead of through the Watermill metadata that
// publisher.Marshaler.Unmarshal makes; this test holds it to what reading
// that metadata gives, field by field, for deliveries of every shape.
func TestToDeliveryReadsWhatTheMarshalerUnmarshals(t *testing.T) {
	now := time.Now()
	ts := time.Date(2026, 12, 1, 10, 11, 12, 0, time.FixedZone("CET", 3600))
	deliveries := map[string]amqp.Delivery{
		"an event from the relay": {
			MessageId: "01JZ0000000000000000000000", AppId: "crm", Type: "company.updated",
			Exchange: "crm.events", RoutingKey: "company.updated", ContentType: "application/json",
			DeliveryMode: 2, Timestamp: ts, DeliveryTag: 7, CorrelationId: "corr", UserId: "guest",
			Headers: amqp.Table{
				publisher.HeaderAggregateType: "company", publisher.HeaderAggregateID: "42",
				publisher.HeaderAggregateVersion: int64(3), "traceparent": "00-abc-def-01",
			},
			Body: []byte(`{"id":42}`),
		},
		"a retry, back through the default exchange": {
			MessageId: "m-2", RoutingKey: "billing", Redelivered: true, Priority: 4, ReplyTo: "r",
			Expiration: "60000", ContentEncoding: "gzip", DeliveryTag: 99,
			Headers: amqp.Table{
				publisher.HeaderAttempt: int32(3), publisher.HeaderError: "boom",
				publisher.HeaderFirstFailedAt:    "2026-12-01T10:00:00.123456789Z",
				publisher.HeaderOriginalExchange: "crm.events", publisher.HeaderOriginalRouting: "company.created",
				publisher.HeaderDeath: []any{amqp.Table{"count": int64(1), "time": ts, "queue": "billing.retry.1s"}},
				"x-delivery-count":    int64(1), "flag": true, "bytes": []byte{1, 2, 3}, "ratio": 0.5,
			},
		},
		"malformed: no id, a reserved header, a bad version": {
			Headers: amqp.Table{publisher.MetaPrefix + "exchange": "forged", publisher.HeaderAggregateVersion: "v3"},
			Body:    []byte("x"),
		},
		"an id that is not UTF-8": {MessageId: "a\xffb", DeliveryTag: 1},
		"nothing but an id":       {MessageId: "bare", DeliveryTag: 1},
	}
	for name, raw := range deliveries {
		t.Run(name, func(t *testing.T) {
			raw.Acknowledger = nopAcknowledger{}
			msg, err := publisher.Marshaler{}.Unmarshal(raw)
			require.NoError(t, err)
			id, malformed := publisher.Inspect(raw)
			require.Equal(t, msg.UUID, id)
			require.Equal(t, msg.Metadata.Get(publisher.MetaMalformed), malformed)

			got := toDelivery("billing", &raw, id, now)
			md := msg.Metadata
			want := inbox.Delivery{
				Consumer: "billing", MessageID: msg.UUID, Producer: md.Get(publisher.MetaAppID),
				Exchange: md.Get(publisher.MetaExchange), RoutingKey: md.Get(publisher.MetaRoutingKey),
				EventType: md.Get(publisher.MetaType), ContentType: md.Get(publisher.MetaContentType),
				ContentEncoding: md.Get(publisher.MetaContentEncoding), CorrelationID: md.Get(publisher.MetaCorrelationID),
				ReplyTo: md.Get(publisher.MetaReplyTo), Expiration: md.Get(publisher.MetaExpiration),
				UserID: md.Get(publisher.MetaUserID), Body: msg.Payload, ReceivedAt: now,
				Redelivered:  md.Get(publisher.MetaRedelivered) == "true",
				DeliveryMode: uint8(atoi(md.Get(publisher.MetaDeliveryMode))),
				Priority:     uint8(atoi(md.Get(publisher.MetaPriority))),
				Headers:      map[string]string{},
			}
			want.DeliveryTag, _ = strconv.ParseUint(md.Get(publisher.MetaDeliveryTag), 10, 64)
			if s := md.Get(publisher.MetaTimestamp); s != "" {
				want.Timestamp, err = time.Parse(time.RFC3339Nano, s)
				require.NoError(t, err)
			}
			for k, v := range md {
				if !strings.HasPrefix(k, publisher.MetaPrefix) {
					want.Headers[k] = v
				}
			}
			want.AggregateType = want.Headers[publisher.HeaderAggregateType]
			want.AggregateID = want.Headers[publisher.HeaderAggregateID]
			if v, err := strconv.ParseInt(want.Headers[publisher.HeaderAggregateVersion], 10, 64); err == nil {
				want.AggregateVersion = &v
			}
			if ex, ok := want.Headers[publisher.HeaderOriginalExchange]; ok && want.Exchange == "" {
				want.Exchange, want.RoutingKey = ex, want.Headers[publisher.HeaderOriginalRouting]
			}
			require.Equal(t, want, got.Delivery)
			require.Equal(t, atoi(want.Headers[publisher.HeaderAttempt]), got.trips)
			first, _ := time.Parse(time.RFC3339Nano, want.Headers[publisher.HeaderFirstFailedAt])
			require.Equal(t, first, got.FirstFailedAt)
			arrived := want.Timestamp
			if t := deathTime(want.Headers[publisher.HeaderDeath]); !t.IsZero() {
				arrived = t
			}
			require.Equal(t, arrived, got.arrivedAt)
		})
	}
}

type nopAcknowledger struct{}

func (nopAcknowledger) Ack(uint64, bool) error        { return nil }
func (nopAcknowledger) Nack(uint64, bool, bool) error { return nil }
func (nopAcknowledger) Reject(uint64, bool) error     { return nil }
