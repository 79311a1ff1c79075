package publisher

import (
	"fmt"
	"regexp"
	"time"
)

var namePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// ValidateName checks an application name (a producer or a consumer) against
// the contract: [a-z0-9][a-z0-9-]{0,62}.
func ValidateName(name string) error {
	if !namePattern.MatchString(name) {
		return fmt.Errorf("invalid application name %q: use 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit", name)
	}
	return nil
}

// ExchangeName is the producer's topic exchange: "<producer>.events".
func ExchangeName(producer string) string { return producer + ".events" }

// QueueName is the consumer's queue: "<consumer>".
func QueueName(consumer string) string { return consumer }

// RetryQueueName is the consumer's delayed retry queue for delay d, e.g.
// "billing.retry.5s".
func RetryQueueName(consumer string, d time.Duration) string {
	return consumer + ".retry." + FormatDelay(d)
}

// PoisonQueueName is the consumer's parking queue: "<consumer>.poison".
func PoisonQueueName(consumer string) string { return consumer + ".poison" }

// FormatDelay writes a delay the way queue names carry it: "500ms", "5s",
// "1m", "10m", "1h", "1h30m".
func FormatDelay(d time.Duration) string {
	if d < time.Second || d%time.Second != 0 {
		return fmt.Sprintf("%dms", d.Milliseconds())
	}
	s := d.String() // e.g. "1m0s", "1h30m0s"
	for len(s) > 2 && (s[len(s)-2:] == "0s" && (s[len(s)-3] == 'm' || s[len(s)-3] == 'h')) {
		s = s[:len(s)-2]
	}
	if len(s) > 2 && s[len(s)-2:] == "0m" && s[len(s)-3] == 'h' {
		s = s[:len(s)-2]
	}
	return s
}
