package inbox_test

import (
	"fmt"
	"time"

	"github.com/warrenmq/warren/inbox"
)

// The contract's "delivery as JSON", as `warren inbox show` prints it and
// the HTTP sink posts it.
func ExampleToJSON() {
	d := &inbox.Delivery{
		Consumer:     "billing",
		MessageID:    "0192b3a4-5c6d-7e8f-9a0b-1c2d3e4f5a6b",
		Producer:     "crm",
		Exchange:     "crm.events",
		RoutingKey:   "company.updated",
		EventType:    "company.updated",
		ContentType:  "application/json",
		DeliveryMode: 2,
		Timestamp:    time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC),
		Headers:      map[string]string{"aggregate-id": "42"},
		Body:         []byte(`{"name":"Acme"}`),
		DeliveryTag:  1,
	}
	text, _ := inbox.ToJSON(d, false)
	fmt.Println(string(text))
	binary, _ := inbox.ToJSON(d, true)
	fmt.Println(inbox.JSON(d, true).Body, len(binary) > len(text))
	// Output:
	// {"body":"{\"name\":\"Acme\"}","properties":{"appId":"crm","contentType":"application/json","contentEncoding":"","correlationId":"","deliveryMode":2,"expiration":"","messageId":"0192b3a4-5c6d-7e8f-9a0b-1c2d3e4f5a6b","priority":0,"replyTo":"","type":"company.updated","userId":"","timestamp":1795341600},"headers":{"aggregate-id":"42"},"envelope":{"deliveryTag":1,"exchange":"crm.events","routingKey":"company.updated","redelivered":false}}
	// eyJuYW1lIjoiQWNtZSJ9 true
}
