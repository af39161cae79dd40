package docs_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/telemetry"
	"github.com/authbus/authbus/workers"
)

var update = flag.Bool("update", false, "regenerate the examples of protocol.md from a live installation")

const docPath = "protocol.md"

// block is one fenced block of the document and the marker above it.
type block struct {
	line    int    // of the opening fence, 1-based
	indent  string // before the fence: a block inside a list item is indented
	lang    string // after the opening fence
	marker  string // "example: …" or "headers: …", or ""
	body    string // between the fences, indented as in the document
	start   int    // byte offsets of body in the document
	end     int
	kind    string // from the marker
	subject string // from the marker
}

var markerRE = regexp.MustCompile(`^<!-- (example|headers): ([a-z-]+) (\S+) -->$`)

// parseDoc returns every fenced block. A json block must carry an example
// marker on the line above it, a headers marker may mark a text block, and
// every marker must sit right above a block. Blocks and markers may be
// indented (inside a list item).
func parseDoc(t *testing.T, doc string) []block {
	t.Helper()
	var blocks []block
	lines := strings.SplitAfter(doc, "\n")
	off := 0
	prev := "" // the previous non-blank line
	prevLine := 0
	for i := 0; i < len(lines); i++ {
		raw := strings.TrimRight(lines[i], "\n")
		line := strings.TrimLeft(raw, " ")
		if !strings.HasPrefix(line, "```") {
			if prev != "" && markerRE.MatchString(prev) && strings.TrimSpace(line) != "" {
				t.Errorf("%s:%d: marker %q is not right above a fenced block", docPath, prevLine, prev)
			}
			if strings.TrimSpace(line) != "" {
				prev, prevLine = line, i+1
			}
			off += len(lines[i])
			continue
		}
		b := block{line: i + 1, indent: raw[:len(raw)-len(line)], lang: strings.TrimSpace(strings.TrimPrefix(line, "```"))}
		if m := markerRE.FindStringSubmatch(prev); m != nil {
			b.marker, b.kind, b.subject = m[1]+": "+m[2]+" "+m[3], m[2], m[3]
		}
		off += len(lines[i])
		b.start = off
		for i++; i < len(lines) && strings.TrimRight(lines[i], "\n") != b.indent+"```"; i++ {
			off += len(lines[i])
		}
		if i == len(lines) {
			t.Fatalf("%s:%d: fenced block is not closed", docPath, b.line)
		}
		b.end = off
		b.body = doc[b.start:b.end]
		off += len(lines[i])
		prev, prevLine = "", 0
		blocks = append(blocks, b)
	}
	return blocks
}

// text is the block's body without the indentation of its fence.
func (b block) text() string {
	if b.indent == "" {
		return b.body
	}
	lines := strings.SplitAfter(b.body, "\n")
	for i, l := range lines {
		lines[i] = strings.TrimPrefix(l, b.indent)
	}
	return strings.Join(lines, "")
}

// indented is generated text indented like the block it replaces.
func (b block) indented(text string) string {
	if b.indent == "" {
		return text
	}
	lines := strings.SplitAfter(text, "\n")
	for i, l := range lines {
		if l != "" && l != "\n" {
			lines[i] = b.indent + l
		}
	}
	return strings.Join(lines, "")
}

// TestProtocolExamples decodes every example of protocol.md with the
// decoder the matching message gets on the wire, strictly, and checks that
// re-encoding it gives the same JSON: a field the code does not know, a
// misspelt or missing one, a bad value or a header that does not match its
// message fails here.
func TestProtocolExamples(t *testing.T) {
	raw, err := os.ReadFile(docPath)
	if err != nil {
		t.Fatal(err)
	}
	blocks := parseDoc(t, string(raw))
	subj, _ := events.NewSubjects("")
	seen := map[string]bool{}
	examples := 0
	for i, b := range blocks {
		where := fmt.Sprintf("%s:%d (%s)", docPath, b.line, b.marker)
		switch {
		case b.lang == "json" && !strings.HasPrefix(b.marker, "example: "):
			t.Errorf("%s:%d: json block without an <!-- example: KIND SUBJECT --> marker above it", docPath, b.line)
			continue
		case strings.HasPrefix(b.marker, "example: ") && b.lang != "json":
			t.Errorf("%s: an example must be a json block", where)
			continue
		case strings.HasPrefix(b.marker, "headers: "):
			if b.lang != "text" {
				t.Errorf("%s: a headers block must be a text block", where)
			}
			if i+1 == len(blocks) || blocks[i+1].marker != "example: "+b.kind+" "+b.subject {
				t.Errorf("%s: a headers block must be followed by the example of the same message", where)
			}
			continue
		case b.marker == "":
			continue // prose: shell sessions and the like
		}
		if seen[b.marker] {
			t.Errorf("%s: a second example with the same marker", where)
		}
		seen[b.marker] = true
		var hdr map[string]string
		if i > 0 && blocks[i-1].marker == "headers: "+b.kind+" "+b.subject {
			hdr = parseHeaders(t, where, blocks[i-1].text())
		}
		checkExample(t, where, subj, b, hdr)
		examples++
	}
	if examples < 10 {
		t.Errorf("%s has %d examples; expected one per message kind", docPath, examples)
	}
}

func parseHeaders(t *testing.T, where, body string) map[string]string {
	h := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ": ")
		if !ok {
			t.Errorf("%s: header line %q is not \"Name: value\"", where, sc.Text())
			continue
		}
		h[name] = value
	}
	return h
}

var traceparentRE = regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$`)

func checkExample(t *testing.T, where string, subj events.Subjects, b block, hdr map[string]string) {
	t.Helper()
	data := []byte(b.text())
	word, key, err := subj.Parse(b.subject)
	if err != nil {
		t.Errorf("%s: subject: %v", where, err)
		return
	}
	if tp, ok := hdr["traceparent"]; ok && !traceparentRE.MatchString(tp) {
		t.Errorf("%s: traceparent %q is not W3C trace context", where, tp)
	}
	wantWord := map[string]string{"register-request": "register", "register-reply": "register", "token-reply": "token", "schedule": "proactive", "publish-ack": "401"}
	if w, ok := wantWord[b.kind]; ok && w != word {
		t.Errorf("%s: a %s travels on %s.%s.<key>, not on %s", where, b.kind, subj.Prefix(), w, b.subject)
		return
	}
	switch b.kind {
	case "event", "schedule":
		typ := events.TypeExpiring // a schedule fires as the auth.expiring it holds
		if b.kind == "event" {
			if typ, _, err = subj.ParseEvent(b.subject); err != nil {
				t.Errorf("%s: %v", where, err)
				return
			}
		}
		ev, err := events.Decode(typ, key, data)
		if err != nil {
			t.Errorf("%s: %v", where, err)
			return
		}
		env := ev.Envelope
		if env.Data, err = json.Marshal(ev.Payload()); err != nil {
			t.Fatal(err)
		}
		roundTrip(t, where, data, env)
		checkEventHeaders(t, where, subj, b.kind, ev, key, hdr)
	case "register-request":
		r, err := events.DecodeRegisterRequest(data)
		if err != nil {
			t.Errorf("%s: %v", where, err)
			return
		}
		roundTrip(t, where, data, r)
	case "register-reply":
		var r events.RegisterReply
		if strictDecode(t, where, data, &r) {
			if r.Version < 1 || !events.ValidFingerprint(r.Fingerprint) {
				t.Errorf("%s: version %d fingerprint %q: want version ≥ 1 and 16 lowercase hex", where, r.Version, r.Fingerprint)
			}
			roundTrip(t, where, data, r)
		}
	case "token-reply":
		var r events.Rotated
		if strictDecode(t, where, data, &r) {
			if err := r.Validate(); err != nil {
				t.Errorf("%s: %v", where, err)
			}
			roundTrip(t, where, data, r)
		}
	case "error-reply":
		var r events.ErrorReply
		if !strictDecode(t, where, data, &r) {
			return
		}
		roundTrip(t, where, data, r)
		if events.CodeOf(events.StatusOf(r.Error)) != r.Error {
			t.Errorf("%s: error %q is not an error code of the protocol", where, r.Error)
		}
		if r.ErrorDescription == "" || (r.Reason != "") != (r.Error == events.CodeNeedsReauth) {
			t.Errorf("%s: want an error_description, and a reason exactly for needs_reauth", where)
		}
		if hdr == nil {
			t.Errorf("%s: an error reply example needs its headers block", where)
		} else if hdr["Nats-Service-Error-Code"] != events.StatusOf(r.Error) || hdr["Nats-Service-Error"] != r.ErrorDescription {
			t.Errorf("%s: headers %q do not match the body (want code %s and the description)", where, hdr, events.StatusOf(r.Error))
		}
	case "publish-ack":
		// The stream's answer to a runtime's publish; what the recipe
		// shows is the duplicate that no refresher will answer.
		var ack jetstream.PubAck
		if strictDecode(t, where, data, &ack) {
			if ack.Stream != subj.EventsStream() || ack.Sequence == 0 || !ack.Duplicate {
				t.Errorf("%s: ack %+v: want a duplicate of a report stored in %s", where, ack, subj.EventsStream())
			}
			roundTrip(t, where, data, ack)
		}
	default:
		t.Errorf("%s: unknown example kind %q; use event, schedule, register-request, register-reply, token-reply, error-reply or publish-ack", where, b.kind)
	}
}

func checkEventHeaders(t *testing.T, where string, subj events.Subjects, kind string, ev *events.Event, key events.Key, hdr map[string]string) {
	t.Helper()
	switch {
	case kind == "schedule":
		if hdr["Nats-Schedule-Target"] != subj.Due(events.TypeExpiring, key) || !strings.HasPrefix(hdr["Nats-Schedule"], "@at ") {
			t.Errorf("%s: schedule headers %q: want Nats-Schedule \"@at <time>\" and Nats-Schedule-Target %s", where, hdr, subj.Due(events.TypeExpiring, key))
		}
	case ev.Type == events.Type401 || ev.Type == events.TypeExpiring:
		if want := events.MsgID(ev.Type, key, ev.Fingerprint()); hdr["Nats-Msg-Id"] != want {
			t.Errorf("%s: Nats-Msg-Id %q, want %q (inbound events must carry it)", where, hdr["Nats-Msg-Id"], want)
		}
	}
}

// strictDecode decodes a reply body as a client should: unknown fields are
// an error (roundTrip catches case variants).
func strictDecode(t *testing.T, where string, data []byte, v any) bool {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Errorf("%s: %v", where, err)
		return false
	}
	if dec.More() {
		t.Errorf("%s: more than one JSON value", where)
		return false
	}
	return true
}

// roundTrip fails unless v, encoded again, is the same JSON as orig.
func roundTrip(t *testing.T, where string, orig []byte, v any) {
	t.Helper()
	again, err := json.Marshal(v)
	if err != nil {
		t.Errorf("%s: re-encoding: %v", where, err)
		return
	}
	var a, b any
	if err := json.Unmarshal(orig, &a); err != nil {
		t.Errorf("%s: %v", where, err)
		return
	}
	if err := json.Unmarshal(again, &b); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Errorf("%s: the example does not survive decoding and encoding again:\n doc:  %s\n code: %s", where, compact(orig), again)
	}
}

func compact(b []byte) string {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return string(b)
	}
	return buf.String()
}

// TestGenerateProtocolExamples runs a real installation through the flow
// the document walks through and captures every message on the bus: the
// installation must still produce every example the document shows. With
// -update it rewrites the marked blocks of protocol.md with what it saw
// (message ids, times and tokens differ on every run, so without -update
// the bodies are not compared; TestProtocolExamples checks them).
func TestGenerateProtocolExamples(t *testing.T) {
	gen := generate(t)
	raw, err := os.ReadFile(docPath)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	blocks := parseDoc(t, doc)
	used := map[string]bool{}
	var out strings.Builder
	last := 0
	for _, b := range blocks {
		if b.marker == "" {
			continue
		}
		body, ok := gen[b.marker]
		if !ok {
			t.Errorf("%s:%d: no generated content for %q; the generator must produce every example", docPath, b.line, b.marker)
			continue
		}
		used[b.marker] = true
		out.WriteString(doc[last:b.start])
		out.WriteString(b.indented(body))
		last = b.end
	}
	out.WriteString(doc[last:])
	var unused []string
	for m := range gen {
		if !used[m] {
			unused = append(unused, m)
		}
	}
	sort.Strings(unused)
	for _, m := range unused {
		t.Logf("generated but not in the document: %s", m)
	}
	if t.Failed() || !*update {
		return
	}
	if err := os.WriteFile(docPath, []byte(out.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

// generate walks a live installation through registration, a token
// request, a 401 and its rotation, an expiring event, errors and a
// revocation, and returns the marker → block body of every message.
func generate(t *testing.T) map[string]string {
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) {
		c.Instance = "refresher-1"
		c.Source = "authbus/refresher/refresher-1"
	})
	var mu sync.Mutex
	var bus []*nats.Msg
	sub, err := b.NC.Subscribe(b.Subj.Prefix()+".>", func(m *nats.Msg) {
		mu.Lock()
		defer mu.Unlock()
		bus = append(bus, m)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	// awaitMsg returns the first message on subject that match accepts.
	awaitMsg := func(subject string, match func(*nats.Msg) bool) *nats.Msg {
		t.Helper()
		var found *nats.Msg
		fleet.Eventually(t, 20*time.Second, "a message on "+subject, func() bool {
			mu.Lock()
			defer mu.Unlock()
			for _, m := range bus {
				if m.Subject == subject && (match == nil || match(m)) {
					found = m
					return true
				}
			}
			return false
		})
		return found
	}

	// The test authorization server listens on a random loopback port; the
	// document shows the address a deployment would have, and a client
	// secret that is not the test suite's leak canary.
	asURL := b.AS.BaseURL()
	public := strings.NewReplacer(asURL, "https://auth.example.com", fleet.ClientSecret, "example-client-secret").Replace
	gen := map[string]string{}
	put := func(kind, subject string, data []byte, hdr nats.Header) {
		t.Helper()
		var buf bytes.Buffer
		if err := json.Indent(&buf, data, "", "  "); err != nil {
			t.Fatalf("%s %s: %v: %s", kind, subject, err, data)
		}
		gen["example: "+kind+" "+subject] = public(buf.String()) + "\n"
		if len(hdr) > 0 {
			var names []string
			for name := range hdr {
				names = append(names, name)
			}
			sort.Strings(names)
			var hb strings.Builder
			for _, name := range names {
				for _, v := range hdr[name] {
					fmt.Fprintf(&hb, "%s: %s\n", name, v)
				}
			}
			gen["headers: "+kind+" "+subject] = public(hb.String())
		}
	}
	// A runtime that traces its work sends its trace context along.
	traced := trace.ContextWithSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{
		TraceID:    trace.TraceID{0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36},
		SpanID:     trace.SpanID{0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7},
		TraceFlags: trace.FlagsSampled,
	}))
	request := func(subject string, body []byte, msg ...*nats.Msg) *nats.Msg {
		t.Helper()
		m := nats.NewMsg(subject)
		m.Data = body
		if len(msg) > 0 {
			m = msg[0]
		}
		telemetry.Inject(traced, m.Header)
		reply, err := b.NC.RequestMsg(m, 5*time.Second)
		if err != nil {
			t.Fatalf("request %s: %v", subject, err)
		}
		return reply
	}

	alice := fleet.MustKey(t, "acme.alice.github")
	tok := b.AS.Issue(fleet.ClientID)
	rr := events.RegisterRequest{
		Token: events.RegisterToken{
			AccessToken: tok.AccessToken, TokenType: tok.TokenType,
			RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn,
		},
		TokenEndpoint: b.AS.TokenURL(),
		ClientID:      fleet.ClientID,
		ClientSecret:  fleet.ClientSecret,
		AuthStyle:     events.AuthStyleBasic,
		Scopes:        []string{"repo", "read:user"},
		Resource:      "https://api.github.example/mcp",
	}
	body, _ := json.Marshal(rr)
	reqMsg := nats.NewMsg(b.Subj.Register(alice))
	telemetry.Inject(traced, reqMsg.Header)
	put("register-request", b.Subj.Register(alice), body, reqMsg.Header)
	reply := request(b.Subj.Register(alice), body)
	put("register-reply", b.Subj.Register(alice), reply.Data, reply.Header)
	sched := awaitMsg(b.Subj.Schedule(alice), nil)
	put("schedule", b.Subj.Schedule(alice), sched.Data, sched.Header)

	// The same credential's sibling, registered by issuer (RFC 8414).
	linear := fleet.MustKey(t, "acme.alice.linear")
	tok2 := b.AS.Issue(fleet.ClientID)
	body, _ = json.Marshal(events.RegisterRequest{
		Token:    events.RegisterToken{AccessToken: tok2.AccessToken, TokenType: tok2.TokenType, RefreshToken: tok2.RefreshToken, ExpiresIn: tok2.ExpiresIn},
		Issuer:   asURL,
		ClientID: fleet.ClientID, ClientSecret: fleet.ClientSecret,
	})
	put("register-request", b.Subj.Register(linear), body, nil)
	if r := request(b.Subj.Register(linear), body); r.Header.Get("Nats-Service-Error-Code") != "" {
		t.Fatalf("register by issuer: %s", r.Data)
	}

	reply = request(b.Subj.Token(alice), nil)
	put("token-reply", b.Subj.Token(alice), reply.Data, reply.Header)

	// A runtime's request got 401.
	fp1 := events.Fingerprint(tok.AccessToken)
	encodeAndPublish(t, b, traced, alice, events.Unauthorized{
		Fingerprint: fp1, Runtime: "mcp-client/host-3", Status: 401,
		URL: "https://api.github.example/mcp", ObservedAt: time.Now().UTC().Truncate(time.Millisecond),
	}, fp1)
	m401 := awaitMsg(b.Subj.Event(events.Type401, alice), nil)
	put("event", m401.Subject, m401.Data, m401.Header)
	rot := awaitMsg(b.Subj.Event(events.TypeRotated, alice), func(m *nats.Msg) bool {
		return bytes.Contains(m.Data, []byte(`"version":2`))
	})
	put("event", rot.Subject, rot.Data, rot.Header)
	// A runtime that got 401 with the same token reports it after the
	// rotation: the stream drops the report (recipe, step 2).
	late, err := events.Encode(alice, "mcp-client/host-5", events.Unauthorized{Fingerprint: fp1, Runtime: "mcp-client/host-5", Status: 401})
	if err != nil {
		t.Fatal(err)
	}
	lateMsg := nats.NewMsg(b.Subj.Event(events.Type401, alice))
	lateMsg.Data = late
	lateMsg.Header.Set(nats.MsgIdHdr, events.MsgID(events.Type401, alice, fp1))
	ack := request(lateMsg.Subject, nil, lateMsg)
	put("publish-ack", lateMsg.Subject, ack.Data, nil)
	var v2 struct {
		Data events.Rotated `json:"data"`
	}
	if err := json.Unmarshal(rot.Data, &v2); err != nil {
		t.Fatal(err)
	}

	// A runtime that watches expiry announces it.
	encodeAndPublish(t, b, traced, alice, events.Expiring{Fingerprint: v2.Data.Fingerprint, ExpiresAt: v2.Data.ExpiresAt}, v2.Data.Fingerprint)
	mexp := awaitMsg(b.Subj.Event(events.TypeExpiring, alice), nil)
	put("event", mexp.Subject, mexp.Data, mexp.Header)

	// Errors.
	unknown := fleet.MustKey(t, "acme.alice.jira")
	reply = request(b.Subj.Token(unknown), nil)
	put("error-reply", b.Subj.Token(unknown), reply.Data, reply.Header)
	bad := rr
	bad.AuthStyle = "jwt"
	body, _ = json.Marshal(bad)
	reply = request(b.Subj.Register(alice), body)
	put("error-reply", b.Subj.Register(alice), reply.Data, reply.Header)

	// The user revoked the grant: the next refresh ends in needs_reauth.
	b.AS.Revoke(v2.Data.AccessToken)
	encodeAndPublish(t, b, traced, alice, events.Unauthorized{Fingerprint: v2.Data.Fingerprint, Runtime: "mcp-client/host-3", Status: 401}, v2.Data.Fingerprint)
	nr := awaitMsg(b.Subj.Event(events.TypeNeedsReauth, alice), nil)
	put("event", nr.Subject, nr.Data, nr.Header)
	reply = request(b.Subj.Token(alice), nil)
	put("error-reply", b.Subj.Token(alice), reply.Data, reply.Header)
	return gen
}

// encodeAndPublish publishes an inbound event as a runtime following the
// protocol does: through JetStream, with its Nats-Msg-Id and trace context.
func encodeAndPublish(t *testing.T, b *fleet.Fleet, ctx context.Context, key events.Key, p events.Payload, fp string) {
	t.Helper()
	data, err := events.Encode(key, "mcp-client/host-3", p)
	if err != nil {
		t.Fatal(err)
	}
	m := nats.NewMsg(b.Subj.Event(p.EventType(), key))
	m.Data = data
	m.Header.Set(nats.MsgIdHdr, events.MsgID(p.EventType(), key, fp))
	telemetry.Inject(ctx, m.Header)
	if _, err := b.JS.PublishMsg(context.Background(), m); err != nil {
		t.Fatalf("publish %s: %v", m.Subject, err)
	}
}
