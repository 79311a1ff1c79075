package publisher_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/publisher"
)

func TestPublishConcurrentPipelined(t *testing.T) {
	t.Parallel()
	const goroutines, perGoroutine = 16, 1250
	const total = goroutines * perGoroutine

	a := newAdmin(t)
	producer := unique("pub")
	exchange := publisher.ExchangeName(producer)
	a.deleteExchangeAtEnd(exchange)
	require.NoError(t, publisher.DeclareExchange(t.Context(), a.conn, producer))
	queue := unique("q")
	a.queue(queue, nil, exchange, "#")

	var hookN atomic.Int64
	p := newPublisher(t, publisher.Config{
		OnConfirmed: func(ex string, n int, latency time.Duration) {
			if ex == exchange && latency > 0 {
				hookN.Add(int64(n))
			}
		},
	})
	require.NoError(t, p.Connect(t.Context()))

	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			for i := range perGoroutine {
				if err := p.Publish(exchange, event(producer, fmt.Sprintf("company.g%d", g))); err != nil {
					errs <- fmt.Errorf("goroutine %d message %d: %w", g, i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	t.Logf("%d messages from %d goroutines in %s: %.0f msgs/s", total, goroutines, elapsed.Round(time.Millisecond), total/elapsed.Seconds())

	st := p.Stats()
	t.Logf("stats: %+v", st)
	require.EqualValues(t, total, st.Published)
	require.EqualValues(t, total, st.Confirmed)
	require.Zero(t, st.Returned)
	require.Zero(t, st.Nacked)
	require.Zero(t, st.Failed)
	require.Greater(t, st.MaxOutstanding, 1, "the confirm window was not used: one confirm at a time")
	require.EqualValues(t, total, hookN.Load())
	require.Equal(t, total, a.count(queue))

	// A sample carries every property of the contract.
	ch := a.channel()
	d, ok, err := ch.Get(queue, true)
	require.NoError(t, err)
	require.True(t, ok)
	require.NotEmpty(t, d.MessageId)
	require.True(t, strings.HasPrefix(d.Type, "company.g"))
	require.Equal(t, d.Type, d.RoutingKey)
	require.Equal(t, exchange, d.Exchange)
	require.Equal(t, producer, d.AppId)
	require.Equal(t, "application/json", d.ContentType)
	require.WithinDuration(t, time.Now(), d.Timestamp, time.Minute)
	require.EqualValues(t, amqp.Persistent, d.DeliveryMode)
	require.Equal(t, "corr-"+d.MessageId, d.CorrelationId)
	require.Equal(t, "3600000", d.Expiration)
	require.Equal(t, "company", d.Headers[publisher.HeaderAggregateType])
	require.Equal(t, "42", d.Headers[publisher.HeaderAggregateID])
	require.Equal(t, int64(7), d.Headers[publisher.HeaderAggregateVersion], "aggregate-version must be an AMQP integer")
	require.Equal(t, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", d.Headers[publisher.HeaderTraceparent])
	require.Equal(t, "acme", d.Headers["tenant"])
	require.Equal(t, `{"company":"acme","n":1}`, string(d.Body))
	for k := range d.Headers {
		require.False(t, strings.HasPrefix(k, publisher.MetaPrefix), "header %s leaked", k)
	}
}

func TestPublishOneCallManyMessages(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	producer := unique("batch")
	exchange := publisher.ExchangeName(producer)
	a.deleteExchangeAtEnd(exchange)
	p := newPublisher(t, publisher.Config{Window: 64})
	// The publisher declares the exchange itself before the first publish.
	require.NoError(t, p.Publish(exchange, event(producer, "company.created")))
	queue := unique("q")
	a.queue(queue, nil, exchange, "company.*")

	msgs := make([]*message.Message, 500)
	for i := range msgs {
		msgs[i] = event(producer, "company.updated")
	}
	require.NoError(t, p.Publish(exchange, msgs...))
	require.Equal(t, 500, a.count(queue))
	// In call order on the wire, so in order in the queue.
	got := a.drain(queue)
	for i, d := range got {
		require.Equal(t, msgs[i].UUID, d.MessageId, "position %d", i)
	}
	require.Greater(t, p.Stats().MaxOutstanding, 1)
}

func TestPublishDefaultExchange(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	queue := unique("direct")
	a.queue(queue, nil, "")
	p := newPublisher(t, publisher.Config{Unroutable: publisher.UnroutableKeep})
	m := event("x", "ignored")
	m.Metadata.Set(publisher.MetaRoutingKey, queue)
	require.NoError(t, p.Publish("", m))
	require.Equal(t, 1, a.count(queue))

	// No queue of that name: returned.
	m = event("x", "ignored")
	m.Metadata.Set(publisher.MetaRoutingKey, unique("nobody"))
	require.ErrorIs(t, p.Publish("", m), publisher.ErrUnroutable)
}

func TestUnroutable(t *testing.T) {
	t.Parallel()

	t.Run("count", func(t *testing.T) {
		t.Parallel()
		a := newAdmin(t)
		exchange := unique("unbound") + ".events"
		a.exchange(exchange)
		var mu sync.Mutex
		var hooked []string
		p := newPublisher(t, publisher.Config{
			OnUnroutable: func(ex, key, id string) {
				mu.Lock()
				defer mu.Unlock()
				assert.Equal(t, exchange, ex)
				assert.Equal(t, "company.created", key)
				hooked = append(hooked, id)
			},
		})
		var ids []string
		for range 5 {
			m := event("p", "company.created")
			ids = append(ids, m.UUID)
			require.NoError(t, p.Publish(exchange, m))
		}
		mu.Lock()
		require.Equal(t, ids, hooked)
		mu.Unlock()
		st := p.Stats()
		require.EqualValues(t, 5, st.Returned)
		require.Zero(t, st.Confirmed)
	})

	t.Run("keep", func(t *testing.T) {
		t.Parallel()
		a := newAdmin(t)
		exchange := unique("unbound") + ".events"
		a.exchange(exchange)
		p := newPublisher(t, publisher.Config{Unroutable: publisher.UnroutableKeep})
		m := event("p", "company.deleted")
		err := p.Publish(exchange, m)
		require.ErrorIs(t, err, publisher.ErrUnroutable)
		var ue *publisher.UnroutableError
		require.ErrorAs(t, err, &ue)
		require.Equal(t, m.UUID, ue.MessageID)
		require.Equal(t, "company.deleted", ue.RoutingKey)
		require.Contains(t, err.Error(), m.UUID)
		require.EqualValues(t, 1, p.Stats().Returned)
	})

	t.Run("mixed burst", func(t *testing.T) {
		t.Parallel()
		for _, policy := range []publisher.UnroutablePolicy{publisher.UnroutableCount, publisher.UnroutableKeep} {
			t.Run(policy.String(), func(t *testing.T) {
				t.Parallel()
				testMixedBurst(t, policy)
			})
		}
	})
}

// testMixedBurst publishes routable and unroutable messages concurrently
// and checks that the returns are attributed to exactly the unroutable ids.
func testMixedBurst(t *testing.T, policy publisher.UnroutablePolicy) {
	const goroutines, per = 8, 250
	a := newAdmin(t)
	exchange := unique("mixed") + ".events"
	a.exchange(exchange)
	queue := unique("q")
	a.queue(queue, nil, exchange, "routed.#")

	var mu sync.Mutex
	hooked := map[string]bool{}
	p := newPublisher(t, publisher.Config{
		Unroutable: policy,
		OnUnroutable: func(_, key, id string) {
			mu.Lock()
			defer mu.Unlock()
			assert.False(t, hooked[id], "returned twice: %s", id)
			hooked[id] = true
		},
	})
	require.NoError(t, p.Connect(t.Context()))

	var wantLost, wantRouted, errored sync.Map
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			// Each call publishes a batch of 5 with a pattern that differs per
			// goroutine, so returns and acks interleave on the channel.
			for i := 0; i < per; i += 5 {
				var msgs []*message.Message
				for j := range 5 {
					key := "routed.x"
					if (g+i+j)%3 == 0 {
						key = "lost.x"
					}
					m := event("p", key)
					if key == "lost.x" {
						wantLost.Store(m.UUID, true)
					} else {
						wantRouted.Store(m.UUID, true)
					}
					msgs = append(msgs, m)
				}
				err := p.Publish(exchange, msgs...)
				if policy == publisher.UnroutableCount {
					assert.NoError(t, err)
					continue
				}
				for _, m := range msgs {
					if err != nil && strings.Contains(err.Error(), m.UUID) {
						errored.Store(m.UUID, true)
					}
				}
			}
		})
	}
	wg.Wait()

	lost := keys(&wantLost)
	routed := keys(&wantRouted)
	mu.Lock()
	require.Equal(t, lost, sortedKeys(hooked), "the hook saw exactly the unroutable ids")
	mu.Unlock()
	if policy == publisher.UnroutableKeep {
		require.Equal(t, lost, keys(&errored), "the errors name exactly the unroutable ids")
	}
	st := p.Stats()
	require.EqualValues(t, len(lost), st.Returned)
	require.EqualValues(t, len(routed), st.Confirmed)
	var inQueue []string
	for _, d := range a.drain(queue) {
		inQueue = append(inQueue, d.MessageId)
	}
	sort.Strings(inQueue)
	require.Equal(t, routed, inQueue)
	t.Logf("%d routed, %d unroutable, max outstanding %d", len(routed), len(lost), st.MaxOutstanding)
}

func keys(m *sync.Map) []string {
	var out []string
	m.Range(func(k, _ any) bool { out = append(out, k.(string)); return true })
	sort.Strings(out)
	return out
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func TestNoDeclareMissingExchange(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	p := newPublisher(t, publisher.Config{NoDeclare: true})

	missing := publisher.ExchangeName(unique("missing"))
	err := p.Publish(missing, event("p", "company.created"))
	require.ErrorIs(t, err, publisher.ErrExchangeMissing)
	require.Contains(t, err.Error(), missing)
	require.Contains(t, err.Error(), "warren topology declare")
	t.Logf("error: %v", err)

	// Still usable, for an exchange that exists.
	present := publisher.ExchangeName(unique("present"))
	a.exchange(present)
	queue := unique("q")
	a.queue(queue, nil, present, "#")
	require.NoError(t, p.Publish(present, event("p", "company.created")))
	require.Equal(t, 1, a.count(queue))

	// Concurrent publishes to both keep their own outcomes.
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 25 {
				assert.NoError(t, p.Publish(present, event("p", "company.updated")))
			}
		})
		wg.Go(func() {
			for range 5 {
				assert.ErrorIs(t, p.Publish(missing, event("p", "company.updated")), publisher.ErrExchangeMissing)
			}
		})
	}
	wg.Wait()
	require.Equal(t, 101, a.count(queue))
	require.EqualValues(t, 1, p.Stats().Connects, "a missing exchange must not break the connection")

	// The exchange nobody declared was not created.
	ch := a.channel()
	err = ch.ExchangeDeclarePassive(missing, "topic", true, false, false, false, nil)
	require.Error(t, err)
}

func TestNacked(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	exchange := unique("nack") + ".events"
	a.exchange(exchange)
	queue := unique("full")
	// A full queue that rejects publishes makes the broker nack.
	a.queue(queue, amqp.Table{"x-max-length": int32(1), "x-overflow": "reject-publish"}, exchange, "#")
	p := newPublisher(t, publisher.Config{})
	require.NoError(t, p.Publish(exchange, event("p", "a.b")))
	err := p.Publish(exchange, event("p", "a.b"))
	require.ErrorIs(t, err, publisher.ErrNacked)
	st := p.Stats()
	require.EqualValues(t, 1, st.Nacked)
	require.EqualValues(t, 1, st.Confirmed)
	// The channel survives a nack.
	require.EqualValues(t, 1, st.Connects)
}

func TestPublishContextCancelledWhileWaitingForConnection(t *testing.T) {
	t.Parallel()
	// Nothing listens there: the publisher keeps retrying.
	p := newPublisher(t, publisher.Config{
		Connection:     publisher.ConnectionConfig{URL: "amqp://guest:guest@127.0.0.1:" + freePort(t) + "/"},
		ConfirmTimeout: 10 * time.Second,
	})
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	m := event("p", "a.b")
	m.SetContext(ctx)
	start := time.Now()
	err := p.Publish("x.events", m)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Less(t, time.Since(start), 3*time.Second)

	// Without a context deadline, ConfirmTimeout bounds the wait, and the
	// error says why there is no connection.
	p2 := newPublisher(t, publisher.Config{
		Connection:     publisher.ConnectionConfig{URL: "amqp://guest:guest@127.0.0.1:" + freePort(t) + "/"},
		ConfirmTimeout: 500 * time.Millisecond,
	})
	err = p2.Publish("x.events", event("p", "a.b"))
	require.ErrorIs(t, err, publisher.ErrConnectionLost)
	require.ErrorIs(t, err, publisher.ErrUnreachable)
	t.Logf("error: %v", err)
}

func TestCloseTwiceAndPublishAfterClose(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	exchange := unique("close") + ".events"
	a.exchange(exchange)
	p, err := publisher.New(publisher.Config{Connection: publisher.ConnectionConfig{URL: brokerURL()}, Logger: testLogger(t)})
	require.NoError(t, err)
	require.NoError(t, p.Connect(t.Context()))
	require.NoError(t, p.Publish(exchange, event("p", "a.b")))
	require.NoError(t, p.Close())
	require.NoError(t, p.Close())
	require.ErrorIs(t, p.Publish(exchange, event("p", "a.b")), publisher.ErrClosed)
	require.False(t, p.Connected())

	// Close without ever connecting.
	p2, err := publisher.New(publisher.Config{})
	require.NoError(t, err)
	require.NoError(t, p2.Close())
}

func TestCloseWaitsForOutstandingConfirms(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	exchange := unique("drain") + ".events"
	a.exchange(exchange)
	queue := unique("q")
	a.queue(queue, nil, exchange, "#")
	p, err := publisher.New(publisher.Config{Connection: publisher.ConnectionConfig{URL: brokerURL()}, Logger: testLogger(t)})
	require.NoError(t, err)
	var wg sync.WaitGroup
	var ok atomic.Int64
	for range 8 {
		wg.Go(func() {
			for range 200 {
				if p.Publish(exchange, event("p", "a.b")) != nil {
					return
				}
				ok.Add(1)
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	require.NoError(t, p.Close())
	wg.Wait()
	// Every publish that returned nil is in the queue; none was cut off
	// between write and confirm.
	require.EqualValues(t, ok.Load(), a.count(queue))
	st := p.Stats()
	require.Zero(t, st.Failed)
	t.Logf("published %d before close", ok.Load())
}

func TestConfigValidation(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  publisher.Config
		want string
	}{
		{"bad scheme", publisher.Config{Connection: publisher.ConnectionConfig{URL: "http://guest:secret@localhost/"}}, "connection_string"},
		{"negative heartbeat", publisher.Config{Connection: publisher.ConnectionConfig{Heartbeat: -time.Second}}, "consumer_heartbeat"},
		{"negative keepalive", publisher.Config{Connection: publisher.ConnectionConfig{TCPKeepAlive: -time.Second}}, "tcp_keepalive_timeout"},
		{"unreadable CA", publisher.Config{Connection: publisher.ConnectionConfig{URL: "amqps://localhost/", CAFile: "/nonexistent/ca.pem"}}, "ca_file"},
		{"cert without key", publisher.Config{Connection: publisher.ConnectionConfig{URL: "amqps://localhost/", CertFile: "/nonexistent/c.pem"}}, "key_file"},
		{"TLS files on amqp", publisher.Config{Connection: publisher.ConnectionConfig{CAFile: "/x.pem"}}, "amqps://"},
		{"window", publisher.Config{Window: -1}, "window"},
		{"confirm timeout", publisher.Config{ConfirmTimeout: -time.Second}, "confirm timeout"},
		{"unroutable policy", publisher.Config{Unroutable: 7}, "unroutable policy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := publisher.New(tc.cfg)
			require.Error(t, err)
			require.Contains(t, err.Error(), tc.want)
			require.NotContains(t, err.Error(), "secret")
		})
	}
	c := publisher.Config{}.WithDefaults()
	require.Equal(t, publisher.DefaultWindow, c.Window)
	require.Equal(t, publisher.DefaultConfirmTimeout, c.ConfirmTimeout)
	require.Equal(t, publisher.DefaultURL, c.Connection.URL)
	require.Equal(t, publisher.DefaultHeartbeat, c.Connection.Heartbeat)
	require.NoError(t, c.Validate())
}

func TestMarshalErrorFailsBeforePublishing(t *testing.T) {
	t.Parallel()
	p := newPublisher(t, publisher.Config{})
	m := event("p", "a.b")
	m.UUID = ""
	err := p.Publish("x.events", m)
	require.Error(t, err)
	require.Contains(t, err.Error(), "message_id")
	require.False(t, errors.Is(err, publisher.ErrConnectionLost))
}

// TestReturnArrivesBeforeItsConfirm checks, on a bare amqp091 channel, the
// ordering the publisher's return attribution relies on: with buffered
// NotifyReturn and NotifyPublish channels drained by one goroutine that
// takes every buffered return before each confirm (as the dispatcher
// does), the basic.return of a publish is always seen before its confirm.
func TestReturnArrivesBeforeItsConfirm(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	exchange := unique("order") + ".events"
	a.exchange(exchange)
	queue := unique("q")
	a.queue(queue, nil, exchange, "routed")

	ch := a.channel()
	returns := ch.NotifyReturn(make(chan amqp.Return, 64))
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 512))
	require.NoError(t, ch.Confirm(false))

	const n = 3000
	tagOf := make(map[string]uint64, n)
	unroutable := map[uint64]bool{}
	var mu sync.Mutex
	returnedBefore := map[uint64]bool{} // tag -> its return was seen before its confirm
	done := make(chan error, 1)
	go func() {
		confirmed := 0
		takeReturn := func(r amqp.Return) {
			mu.Lock()
			tag := tagOf[r.MessageId]
			mu.Unlock()
			returnedBefore[tag] = true
		}
		for confirmed < n {
			select {
			case r := <-returns:
				takeReturn(r)
			case c := <-confirms:
			drain:
				for {
					select {
					case r := <-returns:
						takeReturn(r)
					default:
						break drain
					}
				}
				confirmed++
				mu.Lock()
				want := unroutable[c.DeliveryTag]
				mu.Unlock()
				if want != returnedBefore[c.DeliveryTag] {
					done <- fmt.Errorf("tag %d: unroutable %v, return seen before confirm %v", c.DeliveryTag, want, returnedBefore[c.DeliveryTag])
					return
				}
			}
		}
		done <- nil
	}()
	for i := range n {
		key := "routed"
		if i%3 == 0 || i%7 == 0 {
			key = "nowhere"
		}
		id := fmt.Sprintf("m%d", i)
		// Not under mu: GetNextPublishSeqNo takes the channel's confirm
		// lock, which amqp091's reader holds while it hands over a
		// confirm to the goroutine above, which may be waiting for mu.
		tag := ch.GetNextPublishSeqNo()
		mu.Lock()
		tagOf[id] = tag
		unroutable[tag] = key == "nowhere"
		mu.Unlock()
		require.NoError(t, ch.Publish(exchange, key, true, false, amqp.Publishing{MessageId: id, DeliveryMode: amqp.Persistent, Body: []byte("x")}))
	}
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("confirms did not arrive")
	}
}

// TestExchangeDeletedUnderThePublisher: a publish to an exchange deleted
// after it was declared kills the channel (404); the publisher fails what
// was outstanding, reconnects, declares again and goes on.
func TestExchangeDeletedUnderThePublisher(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	exchange := unique("deleted") + ".events"
	a.deleteExchangeAtEnd(exchange)
	p := newPublisher(t, publisher.Config{ReconnectMin: 10 * time.Millisecond})
	require.NoError(t, p.Publish(exchange, event("p", "a.b")))

	ch := a.channel()
	require.NoError(t, ch.ExchangeDelete(exchange, false, false))
	err := p.Publish(exchange, event("p", "a.b"))
	require.ErrorIs(t, err, publisher.ErrConnectionLost)
	require.Contains(t, err.Error(), "404")
	t.Logf("error: %v", err)

	require.NoError(t, p.Publish(exchange, event("p", "a.b")))
	require.EqualValues(t, 2, p.Stats().Connects)
}

// TestPublishToAmqTopic: the broker's own amq.* exchanges are checked, never
// declared (declaring them is refused).
func TestPublishToAmqTopic(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	queue := unique("amq")
	key := unique("key")
	a.queue(queue, nil, "amq.topic", key)
	p := newPublisher(t, publisher.Config{Unroutable: publisher.UnroutableKeep})
	m := event("p", key)
	require.NoError(t, p.Publish("amq.topic", m))
	require.Equal(t, 1, a.count(queue))
}

// TestInvalidMessageIsRefusedBeforeSending: what the broker or amqp091
// would answer by closing the channel or connection is refused up front,
// and the connection serves the other publishes.
func TestInvalidMessageIsRefusedBeforeSending(t *testing.T) {
	t.Parallel()
	a := newAdmin(t)
	exchange := unique("invalid") + ".events"
	a.exchange(exchange)
	queue := unique("q")
	a.queue(queue, nil, exchange, "#")
	p := newPublisher(t, publisher.Config{})
	require.NoError(t, p.Publish(exchange, event("p", "a.b")))

	for name, mutate := range map[string]func(m *message.Message){
		"long routing key":    func(m *message.Message) { m.Metadata.Set(publisher.MetaRoutingKey, strings.Repeat("k", 300)) },
		"long type":           func(m *message.Message) { m.Metadata.Set(publisher.MetaType, strings.Repeat("t", 256)) },
		"long message id":     func(m *message.Message) { m.UUID = strings.Repeat("i", 256) },
		"long header name":    func(m *message.Message) { m.Metadata.Set(strings.Repeat("h", 256), "v") },
		"bad expiration":      func(m *message.Message) { m.Metadata.Set(publisher.MetaExpiration, "1h") },
		"negative expiration": func(m *message.Message) { m.Metadata.Set(publisher.MetaExpiration, "-5") },
		"bad timestamp":       func(m *message.Message) { m.Metadata.Set(publisher.MetaTimestamp, "yesterday") },
		"no message id":       func(m *message.Message) { m.UUID = "" },
	} {
		m := event("p", "a.b")
		mutate(m)
		ok := event("p", "a.b")
		err := p.Publish(exchange, ok, m)
		require.ErrorIs(t, err, publisher.ErrInvalidMessage, name)
		t.Logf("%s: %v", name, err)
	}
	require.NoError(t, p.Publish(exchange, event("p", "a.b")))
	st := p.Stats()
	require.EqualValues(t, 1, st.Connects, "the connection survived")
	require.EqualValues(t, 2, st.Published, "nothing of an invalid call was sent")
	require.Equal(t, 2, a.count(queue))
}

// TestPublishEachReportsEveryMessage: one call, one outcome per message in
// call order. An invalid message (a routing key too long, no message id)
// fails alone, an unroutable one (policy keep) fails with ErrUnroutable,
// and the others reach the queue; the confirm hook sees each routed message
// once, with its own latency. PublishPrepared, given what the Marshaler
// makes of the same messages, does the same.
func TestPublishEachReportsEveryMessage(t *testing.T) {
	t.Parallel()
	for _, method := range []string{"PublishEach", "PublishPrepared"} {
		t.Run(method, func(t *testing.T) {
			t.Parallel()
			a := newAdmin(t)
			exchange := unique("each") + ".events"
			a.exchange(exchange)
			queue := unique("q")
			a.queue(queue, nil, exchange, "company.*")
			var confirmed atomic.Int64
			p := newPublisher(t, publisher.Config{
				Unroutable: publisher.UnroutableKeep,
				OnConfirmed: func(ex string, n int, latency time.Duration) {
					assert.Equal(t, exchange, ex)
					assert.Equal(t, 1, n)
					assert.Positive(t, latency)
					confirmed.Add(int64(n))
				},
			})

			msgs := make([]*message.Message, 40)
			for i := range msgs {
				msgs[i] = event("p", "company.updated")
			}
			msgs[7].Metadata.Set(publisher.MetaRoutingKey, strings.Repeat("k", 300)) // invalid
			msgs[20] = event("p", "nobody.listens")                                  // unroutable
			noID := event("p", "company.updated")
			noID.UUID = "" // invalid
			msgs[30] = noID
			var errs []error
			if method == "PublishEach" {
				errs = p.PublishEach(exchange, msgs...)
			} else {
				pubs := make([]publisher.Prepared, len(msgs))
				for i, m := range msgs {
					pub, _ := publisher.Marshaler{}.Marshal(m)
					pub.MessageId = m.UUID
					pubs[i] = publisher.Prepared{RoutingKey: m.Metadata.Get(publisher.MetaRoutingKey), Publishing: pub}
				}
				errs = p.PublishPrepared(t.Context(), exchange, pubs)
			}
			require.Len(t, errs, len(msgs))
			for i, err := range errs {
				switch i {
				case 7, 30:
					require.ErrorIs(t, err, publisher.ErrInvalidMessage)
				case 20:
					require.ErrorIs(t, err, publisher.ErrUnroutable)
				default:
					require.NoError(t, err, "message %d", i)
				}
			}
			require.Equal(t, 37, a.count(queue))
			require.EqualValues(t, 37, confirmed.Load())
			got := a.drain(queue)
			var want []string
			for i, m := range msgs {
				if i != 7 && i != 20 && i != 30 {
					want = append(want, m.UUID)
				}
			}
			var ids []string
			for _, d := range got {
				ids = append(ids, d.MessageId)
			}
			require.Equal(t, want, ids, "in call order")

			// Publish keeps its all-or-nothing refusal of an invalid call.
			require.ErrorIs(t, p.Publish(exchange, event("p", "company.x"), msgs[7]), publisher.ErrInvalidMessage)
			require.Zero(t, a.count(queue))
		})
	}
}
