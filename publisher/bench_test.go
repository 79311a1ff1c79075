package publisher_test

import (
	"bytes"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/warrenmq/warren/publisher"
)

// BenchmarkPublish publishes 300-byte persistent messages, one per Publish
// call, from 32 goroutines to a quorum queue, with the confirm window at
// 512 and at 1 (one confirm at a time, as watermill-amqp's publisher does).
func BenchmarkPublish(b *testing.B) {
	for _, window := range []int{512, 1} {
		b.Run(fmt.Sprintf("window-%d", window), func(b *testing.B) {
			a := newAdmin(b)
			exchange := unique("bench") + ".events"
			a.exchange(exchange)
			queue := unique("bench-q")
			a.queue(queue, amqp.Table{"x-queue-type": "quorum"}, exchange, "#")
			p := newPublisher(b, publisher.Config{Window: window, Logger: discardLogger()})
			if err := p.Connect(b.Context()); err != nil {
				b.Fatal(err)
			}
			payload := bytes.Repeat([]byte("x"), 300)
			goroutines := benchGoroutines
			var next atomic.Int64
			var failed atomic.Value
			b.ResetTimer()
			var wg sync.WaitGroup
			for range goroutines {
				wg.Go(func() {
					for next.Add(1) <= int64(b.N) {
						m := message.NewMessage(fmt.Sprintf("m-%d", next.Load()), payload)
						m.Metadata.Set(publisher.MetaRoutingKey, "bench.event")
						if err := p.Publish(exchange, m); err != nil {
							failed.Store(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			if err, _ := failed.Load().(error); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
			b.ReportMetric(float64(p.Stats().MaxOutstanding), "max-outstanding")
		})
	}
}

// benchGoroutines is how many goroutines publish at once in BenchmarkPublish.
var benchGoroutines = 256
