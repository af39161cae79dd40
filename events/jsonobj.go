package events

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"time"
	"unicode/utf8"

	jsonv2 "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

// The wire protocol is read by many languages, so its JSON objects are
// decoded more strictly than encoding/json does, with
// github.com/go-json-experiment/json (the encoding/json v2 API):
//
//   - member names match json tags exactly; encoding/json would also accept
//     "Subject" or "SUBJECT" for "subject", which another decoder ignores;
//   - a member that appears twice is refused; encoding/json keeps the last,
//     other decoders the first, so the two would act on different values;
//   - invalid UTF-8 is refused; encoding/json replaces it, another decoder
//     may keep the bytes;
//   - an error carries the JSON pointer of the member it is about.
//
// What this file adds is the message layer: each error becomes a problem
// that names the field by its path ("token.expires_in") and says what to
// send instead; and a member whose name differs from a known one only in
// case is refused even where unknown members are allowed (CloudEvents
// extensions), because another decoder may take it for the known one.

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

// decodeObject decodes the JSON object b into *v and returns what is wrong
// with it; path is the field path of b ("" at the top). Unknown members are
// ignored when allowUnknown (CloudEvents extensions, payload fields of a
// newer version) and refused otherwise; members whose name differs from a
// known one only in case are always refused. A JSON null leaves its field
// at the zero value.
func decodeObject[T any](path string, b []byte, v *T, allowUnknown bool) []problem {
	err := jsonv2.Unmarshal(b, v, jsonv2.RejectUnknownMembers(true))
	var sem *jsonv2.SemanticError
	if allowUnknown && errors.As(err, &sem) && errors.Is(sem.Err, jsonv2.ErrUnknownName) {
		// Unknown members are allowed here, but not one that spells a known
		// name in another case: decode again without refusing them, then
		// look at the names. Only an input with unknown members pays for
		// the second pass.
		var zero T
		*v = zero
		if err = jsonv2.Unmarshal(b, v); err == nil {
			if ps := caseVariants(path, reflect.TypeFor[T](), b); len(ps) > 0 {
				return ps
			}
		}
	}
	if err != nil {
		return []problem{explain(path, reflect.TypeFor[T](), b, err)}
	}
	if i := bytes.IndexFunc(b, func(r rune) bool { return !isSpace(r) }); i < 0 || b[i] != '{' {
		return []problem{{field: path, msg: "is not a JSON object"}} // a null, which Unmarshal accepts
	}
	return nil
}

func isSpace(r rune) bool { return r == ' ' || r == '\t' || r == '\n' || r == '\r' }

// caseVariants returns a problem for each member name of the valid JSON
// object b that differs from a field of t only in case.
func caseVariants(path string, t reflect.Type, b []byte) []problem {
	var ps []problem
	known := fieldNames(t)
	// b was decoded already: its names are unique and its strings UTF-8.
	dec := jsontext.NewDecoder(bytes.NewReader(b), jsontext.AllowDuplicateNames(true), jsontext.AllowInvalidUTF8(true))
	if _, err := dec.ReadToken(); err != nil { // the '{'
		return nil
	}
	for dec.PeekKind() == '"' && len(ps) <= maxProblems {
		tok, err := dec.ReadToken()
		if err != nil {
			break
		}
		name := tok.String() // before SkipValue voids tok
		if dec.SkipValue() != nil {
			break
		}
		for _, k := range known {
			if k != name && strings.EqualFold(k, name) {
				ps = append(ps, problem{field: quote(joinPath(path, name)),
					msg: fmt.Sprintf("is not a field (names are case-sensitive); use %q", k)})
			}
		}
	}
	return ps
}

// explain turns an error of jsonv2.Unmarshal of b into t into a problem.
func explain(path string, t reflect.Type, b []byte, err error) problem {
	var syn *jsontext.SyntacticError
	var sem *jsonv2.SemanticError
	switch {
	case errors.As(err, &syn):
		where := ""
		if at := pointerPath(syn.JSONPointer); at != "" {
			where = " (at " + quote(at) + ")"
		}
		switch {
		case errors.Is(err, jsontext.ErrDuplicateName):
			return problem{field: joinPath(path, pointerPath(syn.JSONPointer.Parent())),
				msg: fmt.Sprintf("has the field %s twice; send each field once", quote(syn.JSONPointer.LastToken()))}
		case !utf8.Valid(b):
			return problem{field: path, msg: "is not valid UTF-8" + where + "; JSON must be UTF-8 (RFC 8259)"}
		case errors.Is(syn.Err, io.ErrUnexpectedEOF):
			return problem{field: path, msg: "is not valid JSON: it ends too early"}
		}
		return problem{field: path, msg: "is not valid JSON: " + syn.Err.Error() + where}
	case errors.As(err, &sem):
		field := joinPath(path, pointerPath(sem.JSONPointer))
		if errors.Is(sem.Err, jsonv2.ErrUnknownName) {
			parent, name := typeAt(t, sem.JSONPointer.Parent()), sem.JSONPointer.LastToken()
			if known := foldMatch(parent, name); known != "" {
				return problem{field: quote(field), msg: fmt.Sprintf("is not a field (names are case-sensitive); use %q", known)}
			}
			return problem{field: quote(field), msg: fmt.Sprintf("is not a known field; remove it (the fields here are %s)", strings.Join(fieldNames(parent), ", "))}
		}
		return problem{field: field, msg: mismatch(t, sem)}
	}
	return problem{field: path, msg: "is not valid: " + err.Error()}
}

// mismatch explains a JSON value of the wrong kind for its field.
func mismatch(t reflect.Type, sem *jsonv2.SemanticError) string {
	goType, element := sem.GoType, false
	if container := typeAt(t, sem.JSONPointer.Parent()); container != nil && container.Kind() == reflect.Slice {
		goType, element = container, true
	}
	want := describeType(goType)
	switch {
	case goType == nil:
		return "is not valid: " + sem.Error()
	case goType == timeType:
		return "is not " + want
	case goType.Kind() == reflect.Struct && goType != timeType:
		return "is not a JSON object"
	case element:
		return fmt.Sprintf("has an element that is %s; want %s", describeKind(sem), want)
	}
	return fmt.Sprintf("is %s; want %s", describeKind(sem), want)
}

// pointerPath turns a JSON pointer ("/token/scopes/0") into the field path
// of the protocol's messages ("token.scopes"): array indexes are left out,
// the message says "element".
func pointerPath(p jsontext.Pointer) string {
	var parts []string
	for tok := range p.Tokens() {
		if tok != "" && strings.Trim(tok, "0123456789") == "" {
			continue
		}
		parts = append(parts, tok)
	}
	return strings.Join(parts, ".")
}

// typeAt returns the Go type that the JSON pointer p reaches from t, or
// nil when p leaves the tagged fields.
func typeAt(t reflect.Type, p jsontext.Pointer) reflect.Type {
	for tok := range p.Tokens() {
		switch {
		case t == nil:
			return nil
		case t.Kind() == reflect.Slice:
			t = t.Elem()
		case t.Kind() == reflect.Struct:
			t = fieldType(t, tok)
		default:
			return nil
		}
	}
	return t
}

var timeType = reflect.TypeFor[time.Time]()

// jsonName is the member name of a struct field, "" when it has none.
func jsonName(sf reflect.StructField) string {
	name, _, _ := strings.Cut(sf.Tag.Get("json"), ",")
	if !sf.IsExported() || name == "-" {
		return ""
	}
	return name
}

func fieldType(t reflect.Type, name string) reflect.Type {
	for i := range t.NumField() {
		if sf := t.Field(i); jsonName(sf) == name {
			return sf.Type
		}
	}
	return nil
}

// fieldNames lists the member names of struct type t, in declaration order.
func fieldNames(t reflect.Type) []string {
	var names []string
	if t == nil || t.Kind() != reflect.Struct {
		return nil
	}
	for i := range t.NumField() {
		if name := jsonName(t.Field(i)); name != "" {
			names = append(names, name)
		}
	}
	return names
}

// foldMatch returns the member name of t that name spells in another case.
func foldMatch(t reflect.Type, name string) string {
	for _, known := range fieldNames(t) {
		if known != name && strings.EqualFold(known, name) {
			return known
		}
	}
	return ""
}

func joinPath(path, name string) string {
	if path == "" || name == "" {
		return path + name
	}
	return path + "." + name
}

func isNull(raw json.RawMessage) bool {
	return string(bytes.TrimSpace(raw)) == "null"
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

// describeKind words the JSON value an error is about, bounded in length.
func describeKind(sem *jsonv2.SemanticError) string {
	switch sem.JSONKind {
	case '"':
		return "a string"
	case '0':
		if literal := string(sem.JSONValue); literal != "" {
			if len(literal) > maxQuoted {
				literal = literal[:maxQuoted] + "…"
			}
			return "the number " + literal
		}
		return "a number"
	case 't', 'f':
		return "a bool"
	case '{':
		return "an object"
	case '[':
		return "an array"
	case 'n':
		return "null"
	}
	return "a JSON value"
}
