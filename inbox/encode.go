package inbox

import (
	"encoding/json"
	"slices"
	"strconv"
)

// The consumer stores every delivery's headers and properties as JSON. It
// writes them itself, byte for byte as encoding/json would (the tests
// compare the two), at a fraction of the cost of reflection: the encoding
// runs once per delivery.

// encodeProperties encodes p as json.Marshal(p) does.
func encodeProperties(p storedProperties) []byte {
	b := make([]byte, 0, 96)
	b = append(b, '{')
	first := true
	field := func(name string) {
		if !first {
			b = append(b, ',')
		}
		first = false
		b = append(b, '"')
		b = append(b, name...)
		b = append(b, '"', ':')
	}
	str := func(name, v string) {
		if v != "" {
			field(name)
			b = appendJSONString(b, v)
		}
	}
	num := func(name string, v int64) {
		if v != 0 {
			field(name)
			b = strconv.AppendInt(b, v, 10)
		}
	}
	str("contentEncoding", p.ContentEncoding)
	str("correlationId", p.CorrelationID)
	num("deliveryMode", int64(p.DeliveryMode))
	str("expiration", p.Expiration)
	num("priority", int64(p.Priority))
	str("replyTo", p.ReplyTo)
	str("userId", p.UserID)
	num("timestamp", p.Timestamp)
	return append(b, '}')
}

// encodeHeaders encodes h as json.Marshal(h) does: keys in order.
func encodeHeaders(h map[string]string) []byte {
	if len(h) == 0 {
		return []byte("{}")
	}
	keys := make([]string, 0, len(h))
	size := 2
	for k, v := range h {
		keys = append(keys, k)
		size += len(k) + len(v) + 6
	}
	slices.Sort(keys)
	b := make([]byte, 0, size)
	b = append(b, '{')
	for i, k := range keys {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, k)
		b = append(b, ':')
		b = appendJSONString(b, h[k])
	}
	return append(b, '}')
}

// appendJSONString appends s as encoding/json encodes a string: printable
// ASCII other than '"', '\\', '<', '>' and '&' as it is, anything else
// through encoding/json itself.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			enc, err := json.Marshal(s)
			if err != nil { // cannot happen for a string
				enc = []byte(`""`)
			}
			return append(b, enc...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
