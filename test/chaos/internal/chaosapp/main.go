// Command chaosapp is the application process of the chaos test: it
// appends events to the outbox at full speed, in transactions of 1 to
// -max-batch events over -aggregates aggregates, each aggregate's events
// with versions 0, 1, 2, ... It prints "done N" when all are appended.
//
//	chaosapp -db app.db -producer crm -events 100000 -aggregates 500
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"time"

	"github.com/warrenmq/warren/outbox"
	wsql "github.com/warrenmq/warren/sql"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "chaosapp:", err)
		os.Exit(1)
	}
}

func run() error {
	dbPath := flag.String("db", "", "database file (migrated)")
	producer := flag.String("producer", "", "producer")
	events := flag.Int("events", 1000, "events to append")
	aggregates := flag.Int("aggregates", 10, "aggregates")
	maxBatch := flag.Int("max-batch", 20, "most events in one transaction")
	flag.Parse()

	ctx := context.Background()
	db, err := wsql.Open(ctx, *dbPath, wsql.Options{})
	if err != nil {
		return err
	}
	defer db.Close()

	versions := make([]int64, *aggregates)
	start := time.Now()
	for i := 0; i < *events; {
		k := min(1+rand.IntN(*maxBatch), *events-i)
		evs := make([]outbox.Event, 0, k)
		next := append([]int64(nil), versions...)
		for j := 0; j < k; j++ {
			a := rand.IntN(*aggregates)
			evs = append(evs, outbox.Event{Producer: *producer, Type: "account.changed",
				AggregateType: "account", AggregateID: strconv.Itoa(a), AggregateVersion: outbox.Version(next[a]),
				Payload: fmt.Appendf(nil, `{"n":%d,"account":%d,"version":%d}`, i+j, a, next[a])})
			next[a]++
		}
		// A failed transaction appended nothing: try the same events again.
		for attempt := 1; ; attempt++ {
			_, err := outbox.AppendDB(ctx, db, evs...)
			if err == nil {
				break
			}
			if attempt == 20 {
				return fmt.Errorf("append after %d events: %w", i, err)
			}
			fmt.Fprintln(os.Stderr, "chaosapp: append failed, trying again:", err)
			time.Sleep(50 * time.Millisecond)
		}
		versions = next
		i += k
	}
	fmt.Printf("done %d in %s\n", *events, time.Since(start).Round(time.Millisecond))
	return nil
}
