//go:build race

package consumer_test

// raceEnabled is true when the tests run with the race detector, which
// slows everything down several times.
const raceEnabled = true
