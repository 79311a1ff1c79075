// Command bench measures warren side by side with the broker's limit and
// with the Watermill forwarder a Go user would pick instead, in one process
// run on the same broker and machine, and prints a Markdown table of the
// figures, their ratios and the project's targets.
//
//	go run ./test/bench [--quick] [--only 1,2,5] [--repeat N] [--profile DIR] [--verbose]
//
// The figures:
//
//  1. the limit: raw amqp091-go publishing warren's messages with a window
//     of outstanding confirms to a quorum queue bound to a topic exchange
//  2. relay drain: `warren relay` (its own process) draining a backlog
//  3. consumer: the consumer package turning queued messages into inbox
//     rows, next to raw consume-and-ack with the same prefetch
//  4. end to end: an application appending at a steady rate while the
//     relay and the consumer run; commit-to-published and commit-to-inbox
//     latency
//  5. the peer: watermill-sql's outbox on PostgreSQL forwarded by
//     watermill's forwarder to watermill-amqp with confirmed delivery
//  6. growth: relay drain at a small and a large backlog, peak RSS
//
// Ratios measured in the same run are the result; absolute numbers on a
// shared machine are not. The broker is WARREN_URL (default
// amqp://guest:guest@localhost:5672/), PostgreSQL is WARREN_BENCH_PG
// (default postgres://postgres@127.0.0.1:5432/test?sslmode=disable).
// Every exchange, queue and table is named for the run and deleted at the
// end, also on Ctrl-C (a second Ctrl-C quits at once).
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/warrenmq/warren/consumer"
)

// sizes are the phase sizes of a run.
type sizes struct {
	Limit       int           // messages published raw (figure 1)
	Drain       int           // outbox rows drained (figure 2)
	Consume     int           // queued messages consumed (figure 3)
	E2ERate     int           // events appended per second (figure 4)
	E2EDuration time.Duration // how long the application appends (figure 4)
	Peer        int           // messages the forwarder drains (figure 5)
	GrowthSmall int           // small backlog (figure 6)
	GrowthLarge int           // large backlog (figure 6)
	SmallRuns   int           // drains of the small backlog; the median counts
}

var (
	fullSizes = sizes{
		Limit: 100_000, Drain: 100_000, Consume: 100_000,
		E2ERate: 1000, E2EDuration: 30 * time.Second,
		Peer:        100_000,
		GrowthSmall: 10_000, GrowthLarge: 1_000_000, SmallRuns: 5,
	}
	quickSizes = sizes{
		Limit: 20_000, Drain: 20_000, Consume: 20_000,
		E2ERate: 1000, E2EDuration: 10 * time.Second,
		Peer:        3_000,
		GrowthSmall: 10_000, GrowthLarge: 50_000, SmallRuns: 3,
	}
)

// Settings that every phase shares.
const (
	// window is the number of outstanding confirms: the relay's and the
	// publisher's default, used for the raw limit too.
	window = 512
	// aggregates is the number of aggregate ids the events spread over
	// ("company" 0..999, round robin), so that the relay's one-in-flight-
	// per-aggregate rule never limits a window of 512.
	aggregates = 1000
	// payloadSize is the size of every event's JSON payload.
	payloadSize = 300
	// eventType is every event's type and routing key.
	eventType = "company.updated"
)

type options struct {
	quick   bool
	only    []int
	profile string
	verbose bool
	repeat  int
	url     string
	pg      string
	sizes   sizes
}

func (o options) runs(fig int) bool { return len(o.only) == 0 || slices.Contains(o.only, fig) }

func main() {
	var o options
	var only string
	flag.BoolVar(&o.quick, "quick", false, "smaller sizes, finishes in under two minutes")
	flag.StringVar(&only, "only", "", "run only these figures, e.g. 1,2,5 (ratios need the figures they compare)")
	flag.StringVar(&o.profile, "profile", "", "also drain the figure 2 backlog once with the relay in process and write its CPU and heap profiles and execution trace to this folder, and profile the consumer of figure 3")
	flag.IntVar(&o.repeat, "repeat", 1, "measure the limit and the relay drain, and the consumer and raw consume-and-ack, this many times, each pair in turn first; the median ratio counts")
	flag.BoolVar(&o.verbose, "verbose", false, "print the relay's log lines and the end-to-end latencies over time")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: go run ./test/bench [--quick] [--only 1,2,5] [--repeat N] [--profile DIR] [--verbose]\n\n")
		fmt.Fprintf(os.Stderr, "Benchmarks warren against the broker's limit and the Watermill forwarder in one run.\n")
		fmt.Fprintf(os.Stderr, "Broker: WARREN_URL (default %s); PostgreSQL: WARREN_BENCH_PG (default %s).\n\n", defaultURL, defaultPG)
		flag.PrintDefaults()
	}
	flag.Parse()
	// This process runs the consumer of figures 3 and 4 as an application
	// should, and as `warren consume` does: consumer.TuneProcess.
	consumer.TuneProcess()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "bench: unexpected argument %q\n", flag.Arg(0))
		flag.Usage()
		os.Exit(2)
	}
	for _, f := range strings.FieldsFunc(only, func(r rune) bool { return r == ',' || r == ' ' }) {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 6 {
			fmt.Fprintf(os.Stderr, "bench: --only %q: figures are numbered 1 to 6\n", only)
			os.Exit(2)
		}
		o.only = append(o.only, n)
	}
	if o.repeat < 1 {
		fmt.Fprintf(os.Stderr, "bench: --repeat %d: at least 1\n", o.repeat)
		os.Exit(2)
	}
	o.url = envOr("WARREN_URL", defaultURL)
	o.pg = envOr("WARREN_BENCH_PG", defaultPG)
	o.sizes = fullSizes
	if o.quick {
		o.sizes = quickSizes
	}

	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	// A closed stdout (| head) must not kill the bench before it cleans up.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	go func() {
		<-sigs
		fmt.Fprintln(os.Stderr, "\nbench: interrupted; cleaning up (press Ctrl-C again to quit at once)")
		cancel()
		<-sigs
		os.Exit(130)
	}()

	err := run(ctx, o)
	cancel()
	if err != nil {
		if errors.Is(err, context.Canceled) {
			os.Exit(130)
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) (err error) {
	b, err := newBench(ctx, o)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := b.cleanup(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	r := &results{}
	mode := "full"
	if o.quick {
		mode = "quick"
	}
	b.logf("warren bench, %s mode, run %s: broker %s (RabbitMQ %s), %d CPUs", mode, b.id, redact(o.url), b.machine.RabbitMQ, b.machine.CPUs)

	// The limit and the relay drain side by side, --repeat times, in turn
	// first (so that neither always runs while the broker still deletes
	// the other's queue).
	for i := 0; i < o.repeat && (o.runs(1) || o.runs(2)); i++ {
		round := ""
		if o.repeat > 1 {
			round = fmt.Sprintf(" (%d/%d)", i+1, o.repeat)
		}
		limit := func() error {
			if !o.runs(1) {
				return nil
			}
			l, err := b.limit(ctx, o.sizes.Limit, round)
			if err != nil {
				return fmt.Errorf("figure 1 (the limit): %w", err)
			}
			r.limits = append(r.limits, l)
			return nil
		}
		drain := func() error {
			if !o.runs(2) {
				return nil
			}
			d, err := b.relayDrain(ctx, o.sizes.Drain, "2 relay drain"+round, 0)
			if err != nil {
				return fmt.Errorf("figure 2 (relay drain): %w", err)
			}
			r.drains = append(r.drains, d)
			return nil
		}
		first, second := limit, drain
		if i%2 == 1 {
			first, second = drain, limit
		}
		if err := first(); err != nil {
			return err
		}
		if err := second(); err != nil {
			return err
		}
	}
	r.pickMedian()
	if o.runs(2) {
		if o.profile != "" {
			if r.profile, err = b.profileDrain(ctx, o.sizes.Drain, o.profile); err != nil {
				return fmt.Errorf("figure 2 (profiled relay drain): %w", err)
			}
		}
	}
	if o.runs(3) {
		// The consumer and raw consume-and-ack side by side, --repeat
		// times, in turn first; the round with the median ratio is
		// reported.
		type pair struct{ c, raw rate }
		var pairs []pair
		for round := range o.repeat {
			c, raw, cfg, err := b.consume(ctx, o.sizes.Consume, round%2 == 1)
			if err != nil {
				return fmt.Errorf("figure 3 (consumer): %w", err)
			}
			r.consumeCfg = cfg
			pairs = append(pairs, pair{c, raw})
			r.consumeRatios = append(r.consumeRatios, c.PerSec()/raw.PerSec())
		}
		sorted := slices.Clone(pairs)
		slices.SortFunc(sorted, func(a, b pair) int {
			return cmp.Compare(a.c.PerSec()/a.raw.PerSec(), b.c.PerSec()/b.raw.PerSec())
		})
		mid := (len(sorted) - 1) / 2 // the lower middle of an even count
		r.consumer, r.rawConsume = sorted[mid].c, sorted[mid].raw
	}
	if o.runs(4) {
		if r.floor, err = b.brokerFloor(ctx, o.sizes.E2ERate, o.sizes.E2EDuration); err != nil {
			return fmt.Errorf("figure 4 (the broker alone): %w", err)
		}
		if r.e2e, err = b.endToEnd(ctx, o.sizes.E2ERate, o.sizes.E2EDuration); err != nil {
			return fmt.Errorf("figure 4 (end to end): %w", err)
		}
	}
	if o.runs(5) {
		if r.peer, err = b.peer(ctx, o.sizes.Peer); err != nil {
			return fmt.Errorf("figure 5 (the peer): %w", err)
		}
	}
	if o.runs(6) {
		if r.growth, err = b.growth(ctx, o.sizes); err != nil {
			return fmt.Errorf("figure 6 (growth): %w", err)
		}
	}
	report(os.Stdout, o, b.machine, r)
	return nil
}
