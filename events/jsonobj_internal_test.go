package events

import (
	"encoding/json"
	"testing"
	"time"
	"unicode/utf8"
)

// FuzzAssignFast checks the shortcut of decodeMembers against what it
// replaces: for any valid JSON value, whenever assignFast stores a value,
// json.Unmarshal accepts the same input and stores the same value. Its
// input is what decodeMembers passes: valid JSON in valid UTF-8.
func FuzzAssignFast(f *testing.F) {
	for _, s := range []string{`"abc"`, `"a\"b"`, `"é"`, `""`, `null`, `12`, `-7`, `0`, `1.5`, `1e3`,
		`123456789012345678`, `1234567890123456789`, `-0`, `"2026-11-30T04:00:00Z"`, `"2026-11-30T04:00:00.123+02:00"`,
		`"2026-13-30T04:00:00Z"`, `"x"`, `true`, `[1]`, `{"a":1}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		// What decodeMembers hands it: valid JSON, valid UTF-8.
		if !json.Valid(raw) || !utf8.Valid(raw) {
			return
		}
		check := func(name string, fast, slow any, eq func() bool) {
			if !assignFast(fast, raw) {
				return
			}
			if err := json.Unmarshal(raw, slow); err != nil {
				t.Fatalf("%s: assignFast took %q, json.Unmarshal refuses it: %v", name, raw, err)
			}
			if !eq() {
				t.Fatalf("%s: assignFast stored %v, json.Unmarshal %v for %q", name, fast, slow, raw)
			}
		}
		var s1, s2 string
		check("string", &s1, &s2, func() bool { return s1 == s2 })
		var i1, i2 int
		check("int", &i1, &i2, func() bool { return i1 == i2 })
		var l1, l2 int64
		check("int64", &l1, &l2, func() bool { return l1 == l2 })
		var t1, t2 time.Time
		check("time", &t1, &t2, func() bool { return t1.Equal(t2) && t1.Location().String() == t2.Location().String() })
	})
}
