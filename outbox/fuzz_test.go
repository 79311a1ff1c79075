package outbox_test

import (
	"context"
	"strings"
	"testing"

	"github.com/warrenmq/warren/outbox"
	"github.com/warrenmq/warren/test/testenv"
)

// FuzzPlainSQLRow inserts rows the way another language might, with any
// text or number in any column SQLite accepts, and reads them back: the
// read never fails or panics, and a row without an error is one the relay
// can publish (valid name, type, headers, version, expiration).
func FuzzPlainSQLRow(f *testing.F) {
	f.Add("crm", "company.updated", `{"tenant":"acme"}`, "3", "1500", []byte(`{}`), false)
	f.Add("Bad Name", "", `{"n":1}`, "seven", "-1", []byte{0xff}, true)
	f.Add("crm", "t", `not json`, "1.5", "abc", []byte(nil), false)
	f.Add("crm", "t", `{"x-death":"1"}`, "", "", []byte("x"), true)
	f.Add("crm", "t", `{"a":{"b":"c"}}`, "9223372036854775808", "10", []byte("x"), false)
	db, _ := testenv.DB(f)
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, producer, typ, headers, version, expiration string, payload []byte, versionAsNumber bool) {
		var v any = version
		if versionAsNumber {
			v = len(version)
		}
		if payload == nil {
			payload = []byte{}
		}
		res, err := db.ExecContext(ctx, `INSERT INTO warren_outbox (event_id, producer, event_type, headers, aggregate_version, expiration, payload)
			VALUES (lower(hex(randomblob(16))), ?, ?, ?, ?, NULLIF(?, ''), ?)`, producer, typ, headers, v, expiration, payload)
		if err != nil {
			return // the schema refused it (NOT NULL): nothing to read
		}
		seq, _ := res.LastInsertId()
		defer db.ExecContext(ctx, `DELETE FROM warren_outbox WHERE seq = ?`, seq)
		rows, err := outbox.ReadUnpublished(ctx, db, seq-1, 1, 0)
		if err != nil {
			t.Fatalf("reading a hand-written row failed: %v", err)
		}
		if len(rows) != 1 {
			t.Fatalf("read %d rows, want 1", len(rows))
		}
		r := rows[0]
		if r.Err != nil {
			if !strings.Contains(r.Err.Error(), "outbox row seq") {
				t.Fatalf("error does not name the row: %v", r.Err)
			}
			return
		}
		ev := outbox.Event{ID: r.EventID, Producer: r.Producer, Type: r.EventType, Payload: r.Payload, Headers: r.Headers}
		if err := ev.Validate(0); err != nil {
			t.Fatalf("row read as valid but the event is not: %v", err)
		}
		if _, err := outbox.ParseHeaders(headers); err != nil {
			t.Fatalf("row read as valid with bad headers %q: %v", headers, err)
		}
	})
}
