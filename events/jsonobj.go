package events

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// This file decodes JSON objects into structs more strictly than
// encoding/json, because the wire protocol is read by many languages:
//
//   - member names match json tags exactly; encoding/json would also accept
//     "Subject" or "SUBJECT" for "subject", which another decoder ignores;
//   - a member that appears twice is refused; encoding/json keeps the last,
//     other decoders the first, so the two would act on different values;
//   - every problem names its field path ("token.expires_in"), which
//     encoding/json does not do for unknown fields or time formats.

// problem is one thing wrong with an input, tied to its field path.
type problem struct {
	field string // JSON path such as "token.expires_in"; "" for the whole input
	msg   string // what is wrong and what to send instead
}

func (p problem) String() string {
	if p.field == "" {
		return "body " + p.msg
	}
	return p.field + " " + p.msg
}

// member is one name/value pair of a JSON object, in input order.
type member struct {
	name string
	raw  json.RawMessage
}

// objectMembers splits b, which must be exactly one JSON object, into its
// members. The values are sub-slices of b.
// A trusted b is part of an input that was checked already.
func objectMembers(b []byte, trusted bool) ([]member, error) {
	if !trusted {
		// encoding/json silently replaces invalid UTF-8 with U+FFFD; another
		// language's decoder may refuse it or keep the bytes, so refuse it here.
		if !utf8.Valid(b) {
			return nil, errors.New("is not valid UTF-8; JSON must be UTF-8 (RFC 8259)")
		}
		// Validate everything once, then walk the known-good object by
		// hand: json.Decoder would cost three times as much, building and
		// dropping an error for every scalar member. Only invalid input
		// pays for json.Unmarshal, for encoding/json's syntax error text.
		if !json.Valid(b) {
			var whole json.RawMessage
			return nil, jsonErr(json.Unmarshal(b, &whole))
		}
	}
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return nil, errors.New("is not a JSON object")
	}
	i++
	var ms []member
	seen := make(map[string]bool) // not a scan of ms: a 64 KiB body has thousands of members
	for {
		i = skipSpace(b, i)
		if i >= len(b) || b[i] == '}' {
			break
		}
		if b[i] == ',' {
			i = skipSpace(b, i+1)
		}
		keyEnd := endOfValue(b, i)
		name, err := unquote(b[i:keyEnd])
		if err != nil {
			return nil, jsonErr(err)
		}
		i = skipSpace(b, keyEnd) + 1 // past the ':'
		i = skipSpace(b, i)
		valueEnd := endOfValue(b, i)
		if seen[name] {
			return nil, fmt.Errorf("has the field %s twice; send each field once", quote(name))
		}
		seen[name] = true
		ms = append(ms, member{name: name, raw: b[i:valueEnd]})
		i = valueEnd
	}
	return ms, nil
}

// The scanners below run on JSON that json.Unmarshal has accepted, so they
// need not check syntax; they only stay inside b whatever happens.

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// endOfValue returns the index just past the JSON value that starts at i.
func endOfValue(b []byte, i int) int {
	if i >= len(b) {
		return len(b)
	}
	switch b[i] {
	case '"':
		return endOfString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = endOfString(b, i)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return len(b)
	}
	for i < len(b) && !strings.ContainsRune(",}] \t\r\n", rune(b[i])) {
		i++
	}
	return i
}

// endOfString returns the index just past the string that starts at i.
func endOfString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(b)
}

func unquote(s []byte) (string, error) {
	if len(s) >= 2 && bytes.IndexByte(s, '\\') < 0 {
		return string(s[1 : len(s)-1]), nil
	}
	var name string
	err := json.Unmarshal(s, &name)
	return name, err
}

func jsonErr(err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) && strings.Contains(se.Error(), "unexpected end") {
		return errors.New("is not valid JSON: it ends too early")
	}
	return fmt.Errorf("is not valid JSON: %v", err)
}

// fieldInfo describes one JSON-tagged field of a struct.
type fieldInfo struct {
	name   string // the json tag name
	index  int
	typ    reflect.Type
	nested bool // a plain struct decoded member by member, recursively
}

type structInfo struct {
	fields []fieldInfo // in declaration order
}

func (si *structInfo) field(name string) *fieldInfo {
	for i := range si.fields {
		if si.fields[i].name == name {
			return &si.fields[i]
		}
	}
	return nil
}

func (si *structInfo) names() string {
	names := make([]string, len(si.fields))
	for i, f := range si.fields {
		names[i] = f.name
	}
	return strings.Join(names, ", ")
}

var (
	structInfos     sync.Map // reflect.Type → *structInfo
	timeType        = reflect.TypeFor[time.Time]()
	unmarshalerType = reflect.TypeFor[json.Unmarshaler]()
)

func structInfoOf(t reflect.Type) *structInfo {
	if si, ok := structInfos.Load(t); ok {
		return si.(*structInfo)
	}
	si := &structInfo{}
	for i := range t.NumField() {
		sf := t.Field(i)
		name, _, _ := strings.Cut(sf.Tag.Get("json"), ",")
		if !sf.IsExported() || name == "" || name == "-" {
			continue
		}
		nested := sf.Type.Kind() == reflect.Struct && !reflect.PointerTo(sf.Type).Implements(unmarshalerType)
		si.fields = append(si.fields, fieldInfo{name: name, index: i, typ: sf.Type, nested: nested})
	}
	structInfos.Store(t, si)
	return si
}

// decodeObject decodes the JSON object b into the struct v points to, member
// by member, and returns every problem found. path is the field path of b
// ("" at the top). Unknown members are ignored when allowUnknown (CloudEvents
// extensions, payload fields of a newer version) and refused otherwise;
// members whose name differs from a known one only in case are always
// refused. A JSON null leaves its field at the zero value.
func decodeObject(path string, b []byte, v any, allowUnknown bool) []problem {
	return decodeMembers(path, b, v, allowUnknown, false)
}

func decodeMembers(path string, b []byte, v any, allowUnknown, trusted bool) []problem {
	ms, err := objectMembers(b, trusted)
	if err != nil {
		return []problem{{field: path, msg: err.Error()}}
	}
	rv := reflect.ValueOf(v).Elem()
	si := structInfoOf(rv.Type())
	var ps []problem
	for _, m := range ms {
		if len(ps) > maxProblems {
			break // joinProblems shows no more; do not spend work on them
		}
		f := si.field(m.name)
		if f == nil {
			fpath := joinPath(path, m.name)
			if known := si.foldMatch(m.name); known != "" {
				ps = append(ps, problem{field: quote(fpath), msg: fmt.Sprintf("is not a field (names are case-sensitive); use %q", known)})
			} else if !allowUnknown {
				ps = append(ps, problem{field: quote(fpath), msg: fmt.Sprintf("is not a known field; remove it (the fields here are %s)", si.names())})
			}
			continue
		}
		fv := rv.Field(f.index).Addr().Interface()
		if f.nested {
			if !isNull(m.raw) {
				ps = append(ps, decodeMembers(joinPath(path, m.name), m.raw, fv, allowUnknown, true)...)
			}
			continue
		}
		if assignFast(fv, m.raw) {
			continue
		}
		if err := json.Unmarshal(m.raw, fv); err != nil {
			ps = append(ps, problem{field: joinPath(path, m.name), msg: typeMismatch(err, f.typ, m.raw)})
		}
	}
	return ps
}

// assignFast stores the valid JSON value raw into v, as json.Unmarshal
// would, for the common kinds of an event's fields, and reports whether it
// did; otherwise json.Unmarshal does it (and explains a mismatch). It keeps
// decoding an event from paying for reflection and a validation pass per
// field.
func assignFast(v any, raw []byte) bool {
	switch p := v.(type) {
	case *string:
		// Valid JSON without escapes: the bytes between the quotes are the
		// string (control characters cannot occur; UTF-8 was checked).
		if len(raw) >= 2 && raw[0] == '"' && raw[len(raw)-1] == '"' && bytes.IndexByte(raw, '\\') < 0 {
			*p = string(raw[1 : len(raw)-1])
			return true
		}
	case *time.Time:
		// What json.Unmarshal calls for a time; on error it runs again
		// through json.Unmarshal for the same error.
		return p.UnmarshalJSON(raw) == nil
	case *int:
		if n, ok := plainInt(raw); ok && (strconv.IntSize == 64 || int64(int32(n)) == int64(n)) {
			*p = n
			return true
		}
	case *int64:
		if n, ok := plainInt(raw); ok {
			*p = int64(n)
			return true
		}
	}
	return false
}

// plainInt parses a JSON number written as a plain integer of at most 18
// digits (so that it cannot overflow); anything else is left to
// json.Unmarshal.
func plainInt(raw []byte) (int, bool) {
	neg := len(raw) > 0 && raw[0] == '-'
	digits := raw
	if neg {
		digits = raw[1:]
	}
	if len(digits) == 0 || len(digits) > 18 {
		return 0, false
	}
	n := 0
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	if neg {
		n = -n
	}
	return n, true
}

func (si *structInfo) foldMatch(name string) string {
	for _, f := range si.fields {
		if strings.EqualFold(f.name, name) {
			return f.name
		}
	}
	return ""
}

func joinPath(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func isNull(raw json.RawMessage) bool {
	return string(bytes.TrimSpace(raw)) == "null"
}

// typeMismatch explains why a member could not be decoded into a field of
// type t. The members are valid JSON by now, so it is always the kind of
// value that is wrong.
func typeMismatch(err error, t reflect.Type, raw json.RawMessage) string {
	want := describeType(t)
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		if t.Kind() == reflect.Slice && bytes.HasPrefix(bytes.TrimSpace(raw), []byte("[")) {
			return fmt.Sprintf("has an element that is %s; want %s", describeJSONValue(te.Value), want)
		}
		return fmt.Sprintf("is %s; want %s", describeJSONValue(te.Value), want)
	}
	return "is not " + want
}

func describeType(t reflect.Type) string {
	switch {
	case t == timeType:
		return `an RFC 3339 time in UTC such as "2025-06-01T12:00:00Z"`
	case t.Kind() == reflect.String:
		return "a string"
	case t.Kind() >= reflect.Int && t.Kind() <= reflect.Uint64:
		return "an integer"
	case t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.String:
		return "an array of strings"
	case t.Kind() == reflect.Bool:
		return "true or false"
	}
	return "a JSON " + t.Kind().String()
}

// describeJSONValue turns encoding/json's UnmarshalTypeError.Value ("string",
// "number 1.5", …) into words, bounded in length.
func describeJSONValue(v string) string {
	kind, literal, _ := strings.Cut(v, " ")
	switch kind {
	case "number":
		if literal != "" {
			if len(literal) > maxQuoted {
				literal = literal[:maxQuoted] + "…"
			}
			return "the number " + literal
		}
		return "a number"
	case "string", "bool":
		return "a " + kind
	case "object", "array":
		return "an " + kind
	}
	return "a JSON " + quote(v)
}
