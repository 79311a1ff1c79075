package relay

import (
	"strconv"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
)

// toMessage maps an outbox row to the Watermill message the publisher sends,
// per the contract's AMQP message table.
func toMessage(r *outbox.Row) *message.Message {
	msg := message.NewMessage(r.EventID, r.Payload)
	md := msg.Metadata
	md.Set(publisher.MetaExchange, publisher.ExchangeName(r.Producer))
	md.Set(publisher.MetaRoutingKey, r.EventType)
	md.Set(publisher.MetaType, r.EventType)
	md.Set(publisher.MetaAppID, r.Producer)
	md.Set(publisher.MetaContentType, r.ContentType)
	if !r.CreatedAt.IsZero() {
		md.Set(publisher.MetaTimestamp, r.CreatedAt.UTC().Format(time.RFC3339Nano))
	}
	if r.CorrelationID != "" {
		md.Set(publisher.MetaCorrelationID, r.CorrelationID)
	}
	if r.Expiration != "" {
		md.Set(publisher.MetaExpiration, r.Expiration)
	}
	for k, v := range r.Headers {
		md.Set(k, v)
	}
	if r.AggregateType != "" {
		md.Set(publisher.HeaderAggregateType, r.AggregateType)
	}
	if r.AggregateID != "" {
		md.Set(publisher.HeaderAggregateID, r.AggregateID)
	}
	if r.AggregateVersion != nil {
		md.Set(publisher.HeaderAggregateVersion, strconv.FormatInt(*r.AggregateVersion, 10))
	}
	if r.Traceparent != "" {
		md.Set(publisher.HeaderTraceparent, r.Traceparent)
	}
	return msg
}
