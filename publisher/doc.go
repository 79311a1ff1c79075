// Package publisher owns warren's side of AMQP: the broker connection
// (ConnectionConfig, Dial, RedactURL), the confirming publisher the relay
// uses, the producer exchanges (DeclareExchange, VerifyExchange), the
// contract's names (ValidateName, ExchangeName, ...) and the AMQP marshaler.
//
// Publisher is a Watermill message.Publisher. The topic is the exchange,
// the routing key is the metadata MetaRoutingKey, and Publish returns only
// once the broker has confirmed every message:
//
//	pub, err := publisher.New(publisher.Config{
//		Connection: publisher.ConnectionConfig{URL: "amqp://guest:guest@localhost:5672/"},
//	})
//	if err != nil { ... }
//	defer pub.Close()
//	if err := pub.Connect(ctx); err != nil { ... } // fail fast with a clear error
//	msg := message.NewMessage(eventID, payload)
//	msg.Metadata.Set(publisher.MetaRoutingKey, "company.updated")
//	err = pub.Publish(publisher.ExchangeName("crm"), msg)
//
// Concurrent callers share one confirm-mode channel and pipeline their
// publishes up to Config.Window outstanding confirms. Messages are
// mandatory: an unroutable one is counted and logged, or refused with
// ErrUnroutable (UnroutableKeep). A lost connection fails every outstanding
// publish with ErrConnectionLost and the publisher reconnects by itself.
// While the broker blocks the connection (memory or disk alarm) publishes
// wait instead of timing out.
//
// OpsHandler serves the operations endpoint that the relay and the
// consumer share (/metrics, /healthz, /readyz): it lives here, in the one
// package both import, and takes their readiness checks as functions.
//
// The package knows nothing of SQL or of the other warren packages.
package publisher
