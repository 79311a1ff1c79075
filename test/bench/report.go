package main

import (
	"cmp"
	"fmt"
	"io"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// results are the figures of a run; a zero value was not measured.
type results struct {
	limits     []rate  // figure 1, each round
	drains     []drain // figure 2, each round
	limit      rate    // the round with the median ratio (or value)
	drain      drain
	ratios     []float64 // drain / limit, each round
	profile    string
	consumer   rate
	rawConsume rate
	consumeCfg string // the consumer's channels and prefetch
	// consumeRatios are figure 3's rounds, consumer over raw.
	consumeRatios []float64
	e2e           e2eResult
	floor         floorResult
	peer          peerResult
	growth        growthResult
}

// pickMedian picks the round whose drain-to-limit ratio is the median
// (or, with one figure alone, the median value) as the one to report.
func (r *results) pickMedian() {
	n := max(len(r.limits), len(r.drains))
	if n == 0 {
		return
	}
	idx := make([]int, n)
	key := make([]float64, n)
	for i := range idx {
		idx[i] = i
		switch {
		case len(r.limits) == n && len(r.drains) == n:
			key[i] = r.drains[i].PerSec() / r.limits[i].PerSec()
			r.ratios = append(r.ratios, key[i])
		case len(r.drains) == n:
			key[i] = r.drains[i].PerSec()
		default:
			key[i] = r.limits[i].PerSec()
		}
	}
	slices.SortFunc(idx, func(a, b int) int { return cmp.Compare(key[a], key[b]) })
	m := idx[(n-1)/2] // the lower middle of an even count
	if len(r.limits) == n {
		r.limit = r.limits[m]
	}
	if len(r.drains) == n {
		r.drain = r.drains[m]
	}
}

// count formats n with thousands separators: 1,000,000.
func count(n int) string {
	s := strconv.Itoa(n)
	var out []byte
	for i := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out)
}

func perSec(r float64, unit string) string { return count(int(r+0.5)) + " " + unit + "/s" }

func quant(q quantiles) string {
	return fmt.Sprintf("%s / %s / %s ms", ms(q.P50), ms(q.P95), ms(q.P99))
}

func ms(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 1, 64)
}

// verdict is PASS or MISS.
func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

type line struct{ fig, what, value, ratio, target, result string }

func report(w io.Writer, o options, m machine, r *results) {
	s := o.sizes
	mode := "full run"
	if o.quick {
		mode = "quick mode (--quick): smaller sizes, not the figures to publish"
	}
	var ls []line
	add := func(l line) { ls = append(ls, l) }
	na := func(fig, what, why string) { add(line{fig: fig, what: what, value: why}) }

	// 1
	if r.limit.N > 0 {
		add(line{"1", fmt.Sprintf("the limit: raw amqp091-go, %s persistent messages, window %d, quorum queue on a topic exchange", count(r.limit.N), window),
			perSec(r.limit.PerSec(), "msgs"), "1.00", "", ""})
	}
	// 2
	if r.drain.N > 0 {
		l := line{fig: "2", what: fmt.Sprintf("relay drain: `warren relay` process, %s-row backlog to confirmed and marked", count(r.drain.N)),
			value: perSec(r.drain.PerSec(), "events"), target: "≥ 0.85 × limit"}
		if r.limit.N > 0 {
			q := r.drain.PerSec() / r.limit.PerSec()
			l.ratio, l.result = fmt.Sprintf("%.2f × limit", q), verdict(q >= 0.85)
			if len(r.ratios) > 1 {
				var rs []string
				for _, x := range r.ratios {
					rs = append(rs, fmt.Sprintf("%.2f", x))
				}
				l.ratio = fmt.Sprintf("%.2f × limit (median of %s)", q, strings.Join(rs, ", "))
			}
		} else {
			l.ratio = "figure 1 not run"
		}
		add(l)
		l = line{fig: "2", what: "relay drain against the peer (figure 5)", target: "≥ 5 × peer"}
		if r.peer.N > 0 {
			q := r.drain.PerSec() / r.peer.PerSec()
			l.ratio, l.result = fmt.Sprintf("%.1f × peer", q), verdict(q >= 5)
		} else {
			l.ratio = "figure 5 not run"
		}
		add(l)
	}
	// 3
	switch {
	case r.consumer.N > 0:
		l := line{fig: "3", what: fmt.Sprintf("consumer: %s queued messages to processed inbox rows (%s)", count(r.consumer.N), r.consumeCfg),
			value: perSec(r.consumer.PerSec(), "msgs"), target: "≥ 0.70 × raw"}
		q := r.consumer.PerSec() / r.rawConsume.PerSec()
		l.ratio, l.result = fmt.Sprintf("%.2f × raw", q), verdict(q >= 0.70)
		if len(r.consumeRatios) > 1 {
			var rs []string
			for _, x := range r.consumeRatios {
				rs = append(rs, fmt.Sprintf("%.2f", x))
			}
			l.ratio = fmt.Sprintf("%.2f × raw (median of %s)", q, strings.Join(rs, ", "))
		}
		add(l)
		add(line{"3", "raw consume-and-ack: amqp091-go, one channel, the same prefetch, a manual ack of each message", perSec(r.rawConsume.PerSec(), "msgs"), "1.00", "", ""})
	case o.runs(3):
		na("3", "consumer", "not available yet")
	}
	// 4
	switch {
	case r.e2e.N > 0:
		e := r.e2e
		add(line{"4", fmt.Sprintf("end to end: an application appends %s events/s for %s, one per transaction (achieved %s/s; its commits p99 %s ms), relay and consumer running: commit → delivered to a raw consumer of a second queue, p50 / p95 / p99",
			count(s.E2ERate), s.E2EDuration, count(int(e.Achieved+0.5)), ms(e.Commit.P99)),
			quant(e.Delivered), "", "", ""})
		add(line{"4", "end to end: commit → published_at (stamped when the relay marks the row)", quant(e.Published), "", "", ""})
		add(line{"4", "end to end: the relay's own publish → confirm (its warren_relay_confirm_seconds histogram, interpolated within buckets)", quant(e.Confirm), "", "", ""})
		add(line{"4", "end to end: commit → the consumer's inbox transaction committed", quant(e.Inbox), "", "p99 ≤ 25 ms", verdict(e.Inbox.P99 <= 25*time.Millisecond)})
		if f := r.floor; f.N > 0 {
			add(line{"4", fmt.Sprintf("the broker alone, the floor of the above: raw amqp091-go publishes %s/s for %s to the same two quorum queues, raw consumers, while the application appends as above to an outbox no relay reads (its commits p99 %s ms): publish → confirm, p50 / p95 / p99", count(s.E2ERate), s.E2EDuration, ms(f.AppCommit.P99)),
				quant(f.Confirmed), "", "", ""})
			add(line{"4", "the broker alone: publish → delivered to the raw consumer", quant(f.Delivered), "", "", ""})
		}
	case o.runs(4):
		na("4", "end to end", "not available yet")
	}
	// 5
	if r.peer.N > 0 {
		add(line{"5", fmt.Sprintf("the peer: watermill-sql v3 outbox on PostgreSQL, watermill forwarder, watermill-amqp v2 with ConfirmDelivery; %s-message backlog", count(r.peer.N)),
			perSec(r.peer.PerSec(), "events"), "", "", ""})
	}
	// 6
	if len(r.growth.Small) > 0 {
		g := r.growth
		sm := g.SmallMedian()
		add(line{"6", fmt.Sprintf("relay drain at a %s-row backlog (median of %d), into a full quorum queue held at %s messages", count(sm.N), len(g.Small), count(growthQueue)),
			perSec(sm.PerSec(), "events"), "1.00", "", ""})
		q := g.Large.PerSec() / sm.PerSec()
		add(line{"6", fmt.Sprintf("relay drain at a %s-row backlog, same queue (%s/s over rows 10-20%%, %s/s over rows 80-90%%)", count(g.Large.N), count(int(g.Large.First)), count(int(g.Large.Last))),
			perSec(g.Large.PerSec(), "events"), fmt.Sprintf("%.2f × %s", q, count(sm.N)), "no more than 10% slower", verdict(q >= 0.90)})
		add(line{"6", fmt.Sprintf("relay peak RSS (VmHWM) at %s rows (%.1f MiB at %s)", count(g.Large.N), float64(sm.HWMKiB)/1024, count(sm.N)),
			fmt.Sprintf("%.1f MiB", float64(g.Large.HWMKiB)/1024), "", "≤ 64 MiB", verdict(g.Large.HWMKiB <= 64*1024)})
	}

	fmt.Fprintf(w, "\n### warren bench — %s\n\n", mode)
	fmt.Fprintln(w, "| # | figure | value | ratio | target | result |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	for _, l := range ls {
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", l.fig, l.what, l.value, l.ratio, l.target, l.result)
	}

	// Where the CPU went, phase by phase.
	type cpuRow struct {
		phase string
		c     cpuUse
		n     int // messages of the phase
	}
	var cs []cpuRow
	if r.limit.N > 0 {
		cs = append(cs, cpuRow{"1 the limit", r.limit.CPU, r.limit.N})
	}
	if r.drain.N > 0 {
		cs = append(cs, cpuRow{"2 relay drain", r.drain.CPU, r.drain.N})
	}
	if r.consumer.N > 0 {
		cs = append(cs, cpuRow{"3 consumer", r.consumer.CPU, r.consumer.N}, cpuRow{"3 raw consume", r.rawConsume.CPU, r.rawConsume.N})
	}
	if r.floor.N > 0 {
		cs = append(cs, cpuRow{"4 the broker alone", r.floor.CPU, r.floor.N})
	}
	if r.e2e.N > 0 {
		cs = append(cs, cpuRow{"4 end to end", r.e2e.CPU, r.e2e.N})
	}
	if r.peer.N > 0 {
		cs = append(cs, cpuRow{"5 the peer", r.peer.CPU, r.peer.N})
	}
	if len(r.growth.Small) > 0 {
		small, large := r.growth.SmallMedian(), r.growth.Large
		cs = append(cs, cpuRow{"6 drain " + count(small.N), small.CPU, small.N}, cpuRow{"6 drain " + count(large.N), large.CPU, large.N})
	}
	if len(cs) > 0 {
		fmt.Fprintf(w, "\nCPU used during each phase, in cores (%d available), and per message in µs of CPU time: the relay process, the broker, this process (publisher, consumer, appender, forwarder, poller). The CPU per message moves less from run to run than the rates do.\n\n", m.CPUs)
		fmt.Fprintln(w, "| phase | wall | relay | broker | bench | µs per message: relay / broker / bench |")
		fmt.Fprintln(w, "|---|---|---|---|---|---|")
		for _, c := range cs {
			relay, relayPer := "—", "—"
			if c.c.Relay > 0 {
				relay = fmt.Sprintf("%.2f", c.c.Relay)
				relayPer = fmt.Sprintf("%.0f", perMessage(c.c.Relay, c.c.Wall, c.n))
			}
			fmt.Fprintf(w, "| %s | %s | %s | %.2f | %.2f | %s / %.0f / %.0f |\n", c.phase, c.c.Wall.Round(10*time.Millisecond), relay, c.c.Broker, c.c.Bench,
				relayPer, perMessage(c.c.Broker, c.c.Wall, c.n), perMessage(c.c.Bench, c.c.Wall, c.n))
		}
	}

	fmt.Fprintf(w, "\nEvents: %d-byte JSON payloads, type %q, aggregates \"company\" 0..%d round robin; the relay and the limit publish the same AMQP message (warren's marshaler), mandatory and persistent, window %d.", payloadSize, eventType, aggregates-1, window)
	fmt.Fprintf(w, " Drains are timed from the relay's \"relay started\" line to the last published_at (1 ms resolution); the peer from the forwarder's start until the queue holds every message.")
	fmt.Fprintf(w, " Figures 1, 2 and 5 publish into an empty quorum queue that grows to the backlog; figure 6 into one filled to %s messages before each drain and held there (x-max-length, drop-head: the broker drops the oldest for each one published), so that only the outbox grows.", count(growthQueue))
	fmt.Fprintf(w, " End to end: latencies from the application's commit returning; published_at is truncated to the millisecond (half of one is added); the inbox time is when the consumer's transaction commit returned.\n")
	if r.peer.N > 0 {
		fmt.Fprintf(w, "The peer: %s.\n", r.peer.Setup)
	}
	if r.profile != "" {
		fmt.Fprintf(w, "CPU profile of an in-process relay drain: %s\n", r.profile)
	}
	fmt.Fprintf(w, "\nMachine: %d CPUs (%s), %s MiB RAM, %s; RabbitMQ %s (%s)", m.CPUs, m.CPUModel, count(m.MemoryMiB), m.Kernel, m.RabbitMQ, m.Erlang)
	if r.peer.PG != "" {
		fmt.Fprintf(w, ", %s", r.peer.PG)
	}
	fmt.Fprintf(w, "; %s (this process GOMAXPROCS %d, `warren relay` 1: relay.TuneProcess); load average at start %s.\n", m.Go, runtime.GOMAXPROCS(0), m.LoadAvg)
	fmt.Fprintf(w, "Command: `%s`\n", commandLine(m.Command))
}

// commandLine shows how the bench was run: `go run` binaries live in a
// temporary folder, so their path says nothing.
func commandLine(c string) string {
	f := strings.Fields(c)
	if len(f) == 0 {
		return c
	}
	if strings.Contains(f[0], "go-build") || strings.HasSuffix(f[0], "/bench") || f[0] == "bench" {
		f[0] = "go run ./test/bench"
	}
	return strings.Join(f, " ")
}

// perMessage is the CPU time per message, in µs, of a process that used
// cores over wall for n messages.
func perMessage(cores float64, wall time.Duration, n int) float64 {
	if n <= 0 {
		return 0
	}
	return cores * wall.Seconds() / float64(n) * 1e6
}
