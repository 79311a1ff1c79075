package relay

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/publisher"
)

// The relay publishes through PublishPrepared with toPublishing, and
// through any other Watermill publisher with toMessage: both must carry
// the same AMQP message, property by property and header by header.
func TestToPublishingIsWhatTheMarshalerMakes(t *testing.T) {
	t.Parallel()
	version := int64(7)
	zero := int64(0)
	created := time.Date(2026, 12, 2, 1, 2, 3, 456_000_000, time.UTC)
	rows := []outbox.Row{
		{Seq: 1, EventID: "e-1", Producer: "billing", EventType: "invoice.paid", ContentType: "application/json", Payload: []byte(`{}`), CreatedAt: created},
		{Seq: 2, EventID: "e-2", Producer: "billing", EventType: "invoice.paid", ContentType: "text/plain", Payload: []byte("x"),
			AggregateType: "invoice", AggregateID: "42", AggregateVersion: &version, CorrelationID: "c-9", Expiration: "60000",
			Traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", CreatedAt: created.In(time.FixedZone("x", 3600)),
			Headers: map[string]string{"tenant": "acme", "source": "api"}},
		{Seq: 3, EventID: "e-3", Producer: "p", EventType: "t", ContentType: "application/json", AggregateID: "only-id", AggregateVersion: &zero},
		{Seq: 4, EventID: "e-4", Producer: "p", EventType: "t", ContentType: "application/json", Headers: map[string]string{"k": ""}, CreatedAt: created},
	}
	for i := range 50 {
		rows = append(rows, outbox.Row{Seq: int64(10 + i), EventID: fmt.Sprintf("e-%d", 10+i), Producer: "bench", EventType: "company.updated",
			ContentType: "application/json", AggregateType: "company", AggregateID: fmt.Sprint(i % 7), Payload: []byte(fmt.Sprintf(`{"i":%d}`, i)),
			CreatedAt: created.Add(time.Duration(i) * 1_234_567 * time.Nanosecond)})
	}
	for _, r := range rows {
		msg := toMessage(&r)
		want, err := publisher.Marshaler{}.Marshal(msg)
		require.NoError(t, err)
		got := toPublishing(&r)
		require.Equal(t, msg.Metadata.Get(publisher.MetaRoutingKey), got.RoutingKey, "seq %d", r.Seq)
		require.True(t, want.Timestamp.Equal(got.Publishing.Timestamp), "seq %d: timestamp %v, want %v", r.Seq, got.Publishing.Timestamp, want.Timestamp)
		want.Timestamp, got.Publishing.Timestamp = time.Time{}, time.Time{}
		require.Equal(t, want, got.Publishing, "seq %d", r.Seq)
	}
}
