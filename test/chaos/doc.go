// Package chaos runs warren's chaos test: an application process appends
// events at full speed while a relay and a consumer, each its own process,
// are killed with SIGKILL at random moments, their broker connections are
// cut and stalled through a proxy, and a private RabbitMQ node is restarted
// and has its memory alarm raised. At the end every event must have been
// handled exactly once, in per-aggregate order where it was not retried.
//
// The short form (TestChaosShort) is part of the ordinary test run; the
// full run (TestChaos, 100,000 events) needs the build tag stress:
//
//	go tool task stress
package chaos
