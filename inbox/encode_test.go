package inbox

import (
	"encoding/json"
	"testing"
)

func FuzzEncodeIsEncodingJSON(f *testing.F) {
	f.Add("gzip", "corr-1", uint8(2), "60000", uint8(0), "", "guest", int64(1764633600), "tenant", "acme", "x-a", "b")
	f.Add("", "<&>", uint8(0), "", uint8(9), "reply\n", "\u2028", int64(-1), "é", "\x00\xff", "", "")
	f.Fuzz(func(t *testing.T, enc, corr string, mode uint8, exp string, prio uint8, reply, user string, ts int64, k1, v1, k2, v2 string) {
		p := storedProperties{ContentEncoding: enc, CorrelationID: corr, DeliveryMode: mode, Expiration: exp,
			Priority: prio, ReplyTo: reply, UserID: user, Timestamp: ts}
		want, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		if got := encodeProperties(p); string(got) != string(want) {
			t.Fatalf("properties: got %s, encoding/json %s", got, want)
		}
		h := map[string]string{k1: v1, k2: v2}
		want, err = json.Marshal(h)
		if err != nil {
			t.Fatal(err)
		}
		if got := encodeHeaders(h); string(got) != string(want) {
			t.Fatalf("headers: got %s, encoding/json %s", got, want)
		}
	})
}

func TestEncodeEmpty(t *testing.T) {
	if got := string(encodeHeaders(nil)); got != "{}" {
		t.Fatalf("nil headers: %s", got)
	}
	if got := string(encodeProperties(storedProperties{})); got != "{}" {
		t.Fatalf("no properties: %s", got)
	}
}
