// Package broker starts private RabbitMQ nodes for tests and for the
// project's tasks, from the system's rabbitmq-server (Debian's package).
//
// A test that stops or restarts a broker, raises its memory alarm, needs TLS
// or a restricted user, starts a node of its own:
//
//	n := broker.Start(t, broker.Options{})
//	conn, err := amqp.Dial(n.URL)
//
// Each node has a unique name, free ports and its own data folder, so tests
// in parallel, in one process or in several, never share one. Start stops
// the node when the test ends, and a node started for a test is killed by
// the kernel if the test process dies first.
//
// Ensure is what the tasks use: it returns a broker URL that answers,
// starting a private node that outlives the process when nothing answers at
// the configured URL on this machine. EnsureInstalled installs
// rabbitmq-server with apt-get when it is missing and that is allowed.
//
// The package must not import other warren packages.
package broker
