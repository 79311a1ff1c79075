package publisher_test

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/publisher"
	"github.com/warrenmq/warren/test/proxy"
)

// TestConnectionCut cuts the connection three times while five goroutines
// publish; every message must reach the queue at least once.
func TestConnectionCut(t *testing.T) {
	t.Parallel()
	const goroutines, per, batch = 5, 5000, 50
	const total = goroutines * per

	a := newAdmin(t)
	producer := unique("cut")
	exchange := publisher.ExchangeName(producer)
	a.deleteExchangeAtEnd(exchange)
	require.NoError(t, publisher.DeclareExchange(t.Context(), a.conn, producer))
	queue := unique("q")
	a.queue(queue, nil, exchange, "#")

	px := proxy.Start(t, brokerHostPort(t))
	p := newPublisher(t, publisher.Config{
		Connection:     publisher.ConnectionConfig{URL: px.URL(brokerURL()), Heartbeat: 2 * time.Second, DialTimeout: 2 * time.Second},
		ConfirmTimeout: 10 * time.Second,
		ReconnectMin:   20 * time.Millisecond,
		ReconnectMax:   200 * time.Millisecond,
	})
	require.NoError(t, p.Connect(t.Context()))

	var done atomic.Int64 // messages confirmed
	var failures atomic.Int64
	var errKinds sync.Map
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := 0; i < per; i += batch {
				msgs := make([]*message.Message, batch)
				for j := range msgs {
					msgs[j] = event(producer, "company.updated")
					msgs[j].UUID = fmt.Sprintf("g%d-m%05d", g, i+j)
				}
				for attempt := 1; ; attempt++ {
					err := p.Publish(exchange, msgs...)
					if err == nil {
						break
					}
					failures.Add(1)
					switch {
					case errors.Is(err, publisher.ErrConnectionLost):
						errKinds.Store("connection lost", true)
					default:
						errKinds.Store(err.Error(), true)
					}
					if !assert.Less(t, attempt, 100, "giving up: %v", err) {
						return
					}
					// Publishing again is the caller's retry: a fresh message
					// with the same id, as the relay would send it.
					for j, m := range msgs {
						c := event(producer, "company.updated")
						c.UUID = m.UUID
						msgs[j] = c
					}
				}
				done.Add(batch)
			}
		})
	}

	// Cut at 20%, 45% and 70% of the way.
	cuts := 0
	for _, at := range []int64{total * 20 / 100, total * 45 / 100, total * 70 / 100} {
		for done.Load() < at {
			time.Sleep(time.Millisecond)
		}
		px.Cut()
		cuts++
		t.Logf("cut %d at %d confirmed", cuts, done.Load())
		time.Sleep(300 * time.Millisecond)
		px.Restore()
	}
	wg.Wait()
	require.False(t, t.Failed())

	st := p.Stats()
	t.Logf("stats: %+v", st)
	var kinds []string
	errKinds.Range(func(k, _ any) bool { kinds = append(kinds, k.(string)); return true })
	t.Logf("%d failed Publish calls, retried; errors: %v", failures.Load(), kinds)
	require.Equal(t, []string{"connection lost"}, kinds, "every failure is ErrConnectionLost")
	require.GreaterOrEqual(t, st.Connects, uint64(4), "reconnected after each cut by itself")
	require.True(t, p.Connected())

	seen := map[string]int{}
	for _, d := range a.drain(queue) {
		seen[d.MessageId]++
	}
	duplicates := 0
	for _, n := range seen {
		duplicates += n - 1
	}
	for g := range goroutines {
		for i := range per {
			id := fmt.Sprintf("g%d-m%05d", g, i)
			require.Positive(t, seen[id], "message %s is missing", id)
		}
	}
	require.Len(t, seen, total)
	t.Logf("all %d messages arrived; %d duplicates from %d cuts (%.2f%%)", total, duplicates, cuts, 100*float64(duplicates)/total)
}

// TestStall stops all traffic without closing the connection: the heartbeat
// notices it, and the publisher reconnects once traffic flows again.
func TestStall(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	exchange := unique("stall") + ".events"
	a.exchange(exchange)
	queue := unique("q")
	a.queue(queue, nil, exchange, "#")

	const heartbeat = 2 * time.Second
	px := proxy.Start(t, brokerHostPort(t))
	p := newPublisher(t, publisher.Config{
		Connection:     publisher.ConnectionConfig{URL: px.URL(brokerURL()), Heartbeat: heartbeat, DialTimeout: 2 * time.Second},
		ConfirmTimeout: time.Minute, // only the heartbeat can notice
		ReconnectMin:   50 * time.Millisecond,
		ReconnectMax:   500 * time.Millisecond,
	})
	require.NoError(t, p.Publish(exchange, event("p", "a.b")))

	px.Stall()
	stalled := time.Now()
	// A publish in flight during the stall fails with ErrConnectionLost.
	errc := make(chan error, 1)
	go func() { errc <- p.Publish(exchange, event("p", "a.b")) }()
	require.Eventually(t, func() bool { return !p.Connected() }, 4*heartbeat, 50*time.Millisecond,
		"the publisher did not notice the stall within 4 heartbeats")
	noticed := time.Since(stalled)
	t.Logf("noticed the stall after %s (heartbeat %s)", noticed.Round(time.Millisecond), heartbeat)
	require.LessOrEqual(t, noticed, 3*heartbeat+time.Second)
	select {
	case err := <-errc:
		require.ErrorIs(t, err, publisher.ErrConnectionLost)
	case <-time.After(5 * time.Second):
		t.Fatal("the publish in flight did not fail")
	}

	px.Restore()
	require.Eventually(t, p.Connected, 10*time.Second, 50*time.Millisecond, "no reconnection after the stall")
	require.NoError(t, p.Publish(exchange, event("p", "a.b")))
	require.EqualValues(t, 2, p.Stats().Connects)
	require.GreaterOrEqual(t, a.count(queue), 2)
}

// TestOverdueConfirm: when the broker stays silent but the heartbeat does not
// notice (long heartbeat), an overdue confirm breaks the connection.
func TestOverdueConfirm(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	exchange := unique("overdue") + ".events"
	a.exchange(exchange)

	px := proxy.Start(t, brokerHostPort(t))
	p := newPublisher(t, publisher.Config{
		Connection:     publisher.ConnectionConfig{URL: px.URL(brokerURL()), Heartbeat: 60 * time.Second, DialTimeout: 2 * time.Second},
		ConfirmTimeout: time.Second,
		ReconnectMin:   50 * time.Millisecond,
		ReconnectMax:   200 * time.Millisecond,
	})
	require.NoError(t, p.Publish(exchange, event("p", "a.b")))
	px.Stall()
	start := time.Now()
	err := p.Publish(exchange, event("p", "a.b"))
	require.ErrorIs(t, err, publisher.ErrConnectionLost)
	require.Contains(t, err.Error(), "no confirm")
	took := time.Since(start)
	t.Logf("failed after %s: %v", took.Round(time.Millisecond), err)
	require.Less(t, took, 3*time.Second)

	px.Restore()
	require.Eventually(t, func() bool { return p.Publish(exchange, event("p", "a.b")) == nil }, 10*time.Second, 100*time.Millisecond)
	require.GreaterOrEqual(t, p.Stats().Connects, uint64(2))
}

// TestPublishWaitsForReconnection: a publish made while the broker is out
// of reach waits for the reconnection.
func TestPublishWaitsForReconnection(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	exchange := unique("wait") + ".events"
	a.exchange(exchange)
	queue := unique("q")
	a.queue(queue, nil, exchange, "#")

	px := proxy.Start(t, brokerHostPort(t))
	p := newPublisher(t, publisher.Config{
		Connection:     publisher.ConnectionConfig{URL: px.URL(brokerURL())},
		ConfirmTimeout: 10 * time.Second,
		ReconnectMin:   50 * time.Millisecond,
		ReconnectMax:   200 * time.Millisecond,
	})
	require.NoError(t, p.Connect(t.Context()))
	px.Cut()
	require.Eventually(t, func() bool { return !p.Connected() }, 5*time.Second, 10*time.Millisecond)

	errc := make(chan error, 1)
	start := time.Now()
	go func() { errc <- p.Publish(exchange, event("p", "a.b")) }()
	time.Sleep(700 * time.Millisecond)
	select {
	case err := <-errc:
		t.Fatalf("Publish returned while disconnected: %v", err)
	default:
	}
	px.Restore()
	require.NoError(t, <-errc)
	t.Logf("published after %s", time.Since(start).Round(time.Millisecond))
	require.Equal(t, 1, a.count(queue))
}
