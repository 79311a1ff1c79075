// Package relay moves committed outbox rows to RabbitMQ.
//
// A Relay runs a Watermill Router whose subscriber reads warren_outbox in
// seq order and whose handler publishes each row with the confirming
// publisher. A row is marked published only after the broker confirmed it,
// in short batched write transactions; no transaction is open while
// publishing.
//
// Order: at most one event per aggregate is in flight at any time, so the
// events of one aggregate reach the exchange in seq order even when a
// publish is nacked, the connection drops or the relay restarts, while
// events of different aggregates share a large window of confirms.
//
// Wake-up: the subscriber watches the database's WAL file and reads within
// milliseconds of a commit by any process.
//
// Leadership: one relay publishes from a database at a time. A second relay
// on the same file holds as a standby on a lock file next to the database
// and takes over as soon as the first one's process ends.
//
// Stop: cancelling the context given to Run stops reading, waits for the
// outstanding confirms, marks them and returns nil.
//
// Operations: NewMetrics registers the contract's outbox and relay metrics
// (read the backlog on scrape; count what the publisher reports through
// Metrics.PublisherConfig); Ready says whether the database takes a write
// and the broker is connected, for publisher.OpsHandler; published rows
// older than Config.Retention are pruned when the relay starts publishing
// and then every Config.PruneInterval.
package relay
