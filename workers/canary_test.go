package workers_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/sdk/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
)

// Done-when 4 of issue 8: one run through every path that handles a
// secret, then every channel a secret could leave by is searched for every
// token and secret of the run, in plain text and base64: the pools' logs,
// their spans and metrics, the errors and error replies, every message on
// the bus (a wiretap on ">": events, requests, replies, KV and JetStream
// API traffic), and the raw bytes of the NATS server's store files.
//
// Refresh tokens and client secrets may appear only in auth.register
// requests (the protocol carries them there). Access tokens may appear only
// in auth.register requests, auth.rotated events and auth.token replies:
// the credential record seals them like the other secrets, so neither its
// KV traffic nor the store files may hold one.
func TestCanaryEveryChannel(t *testing.T) {
	o := setupObserved(t)
	tap := newWiretap(t, o.Fleet)
	o.start(t, 2, nil)
	ctx := context.Background()
	sec := &secrets{}
	sec.add(&sec.clientSecrets, fleet.ClientSecret)
	var errs []string // every error and error reply the run produced

	// A refresh-token credential: registration, a transient 503, rotation,
	// a stale 401, a token request, an auth.expiring that is not due, a
	// revoked refresh token (needs_reauth), a token request then, and the
	// repair by re-registration.
	keyA := fleet.MustKey(t, "acme.canary.github")
	tokA := o.AS.Issue(fleet.ClientID)
	sec.addTokens(tokA.AccessToken, tokA.RefreshToken)
	o.Register(t, keyA, tokA, nil)
	w := o.Watch(t, keyA)
	o.AS.Fail(1, http.StatusServiceUnavailable, `{"error":"temporarily_unavailable"}`, nil)
	o.publish401(t, keyA, events.Fingerprint(tokA.AccessToken), "rt", true)
	v2 := w.WaitFor(t, "rotation", fleet.RotatedVersion(2)).Rotated
	sec.addTokens(v2.AccessToken, o.Cred(t, keyA).RefreshToken.Reveal())
	o.publish401(t, keyA, events.Fingerprint(tokA.AccessToken), "late-rt", false)
	if code, body := tap.request(t, o.Subj.Token(keyA)); code != "" {
		t.Fatalf("token request: %s %s", code, body)
	}
	exp, err := events.Encode(keyA, "test/rt", events.Expiring{Fingerprint: v2.Fingerprint, ExpiresAt: v2.ExpiresAt})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.JS.Publish(ctx, o.Subj.Event(events.TypeExpiring, keyA), exp); err != nil {
		t.Fatal(err)
	}
	o.AS.Revoke(o.Cred(t, keyA).RefreshToken.Reveal())
	o.publish401(t, keyA, v2.Fingerprint, "rt", true)
	w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	if code, body := tap.request(t, o.Subj.Token(keyA)); code == "" {
		t.Fatalf("token request of a credential in needs_reauth answered %s", body)
	} else {
		errs = append(errs, string(body))
	}
	tokA2 := o.AS.Issue(fleet.ClientID)
	sec.addTokens(tokA2.AccessToken, tokA2.RefreshToken)
	o.Register(t, keyA, tokA2, nil)

	// A client_credentials credential: the client secret is what each
	// refresh sends.
	keyB := fleet.MustKey(t, "acme.canary.batch")
	tokB := o.AS.Issue(fleet.ClientID)
	sec.addTokens(tokB.AccessToken, tokB.RefreshToken)
	o.Register(t, keyB, tokB, clientCredentials)
	wb := o.Watch(t, keyB)
	o.publish401(t, keyB, events.Fingerprint(tokB.AccessToken), "rt", true)
	sec.addTokens(wb.WaitFor(t, "client_credentials rotation", fleet.RotatedVersion(2)).Rotated.AccessToken, "")

	// A credential registered without a refresh token: its 401 ends in
	// needs_reauth without a call.
	keyC := fleet.MustKey(t, "acme.canary.nort")
	tokC := o.AS.Issue(fleet.ClientID)
	sec.addTokens(tokC.AccessToken, tokC.RefreshToken)
	o.Register(t, keyC, tokC, func(r *events.RegisterRequest) { r.Token.RefreshToken = "" })
	wc := o.Watch(t, keyC)
	o.publish401(t, keyC, events.Fingerprint(tokC.AccessToken), "rt", true)
	wc.WaitFor(t, "needs_reauth without a refresh token", func(ev *events.Event) bool { return ev.NeedsReauth != nil })

	// An unknown credential: a token request and a 401.
	keyD := fleet.MustKey(t, "acme.canary.unknown")
	if code, body := tap.request(t, o.Subj.Token(keyD)); code == "" {
		t.Fatalf("token request of an unknown credential answered %s", body)
	} else {
		errs = append(errs, string(body))
	}
	o.publish401(t, keyD, events.Fingerprint("whatever"), "rt", true)

	// Registrations refused while carrying every secret; one puts the
	// client secret into the endpoint URL.
	tokE := o.AS.Issue(fleet.ClientID)
	sec.addTokens(tokE.AccessToken, tokE.RefreshToken)
	for _, bad := range []func(*events.RegisterRequest){
		func(r *events.RegisterRequest) { r.TokenEndpoint = "http://example.com/token" },
		func(r *events.RegisterRequest) {
			r.TokenEndpoint = "https://" + fleet.ClientID + ":" + fleet.ClientSecret + "@example.com/token"
		},
		func(r *events.RegisterRequest) { r.AuthStyle = "shout" },
		func(r *events.RegisterRequest) { r.Token.ExpiresAt = time.Now().Add(time.Hour) },
	} {
		_, err := o.TryRegister(fleet.MustKey(t, "acme.canary.refused"), tokE, bad)
		if err == nil {
			t.Fatal("a bad registration was accepted")
		}
		errs = append(errs, err.Error())
	}

	// A careless runtime: a 401 carrying an access token itself where the
	// fingerprint belongs, and one whose body is not an event at all. The
	// refresher must not echo what it refuses: its intake refuses both,
	// and its answer must not carry the bait. The bait is a token of its
	// own: the bus carried these messages, so it is not searched for it.
	bait := "at-bait-" + rand.Text()
	sec.add(&sec.bait, bait)
	for _, body := range []string{
		fmt.Sprintf(`{"specversion":"1.0","id":"x1","source":"test/rt","type":"auth.401","subject":%q,"time":%q,"datacontenttype":"application/json","data":{"fingerprint":%q,"runtime":"rt"}}`,
			keyA, time.Now().UTC().Format(time.RFC3339), bait),
		"Authorization: Bearer " + bait,
	} {
		msg := nats.NewMsg(o.Subj.Event(events.Type401, keyA))
		msg.Header.Set(baitHeader, "yes")
		msg.Data = []byte(body)
		_, err := o.JS.PublishMsg(ctx, msg)
		var apiErr *jetstream.APIError
		if !errors.As(err, &apiErr) || apiErr.Code != 400 {
			t.Fatalf("a bad 401: %v, want the intake's 400", err)
		}
		if strings.Contains(err.Error(), bait) {
			t.Errorf("the intake's refusal echoes the bait: %v", err)
		}
	}
	fleet.Eventually(t, 10*time.Second, "both bait events refused", func() bool {
		return len(o.Logs.Records(map[string]string{"msg": "event refused", "reason": "bad_input"})) >= 2
	})

	// Errors of the store itself: a key ring without the key, and one with
	// another key under the same id.
	for _, ring := range []*kv.KeyRing{mustRing(t, "other", 9), mustRing(t, "k1", 9)} {
		s, err := kv.OpenStore(ctx, o.JS, o.Subj.CredentialsBucket(), ring)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.Get(ctx, keyA); err == nil {
			t.Fatal("a credential opened with the wrong key ring")
		} else {
			errs = append(errs, err.Error())
		}
	}

	// Every refresh token the server was ever shown, too.
	for _, c := range o.AS.CallLog() {
		sec.add(&sec.refreshTokens, c.RefreshToken)
	}
	o.StopPools(t)
	fleet.Eventually(t, 10*time.Second, "the process spans ended", func() bool {
		return len(o.ended(func(s trace.ReadOnlySpan) bool { return attrOf(s, "authbus.outcome") == "needs_reauth" })) >= 2
	})
	msgs := tap.stop(t)

	// Logs, spans, metrics, errors: no secret of any kind.
	channels := map[string]string{
		"logs":   o.Logs.String(),
		"spans":  strings.Join(spanTexts(o.spans.Ended()), "\n"),
		"errors": strings.Join(errs, "\n"),
	}
	var metrics []string
	for _, sm := range collect(t, o.reader).ScopeMetrics {
		for _, m := range sm.Metrics {
			metrics = append(metrics, fmt.Sprintf("%s %+v", m.Name, m.Data))
		}
	}
	channels["metrics"] = strings.Join(metrics, "\n")
	for name, text := range channels {
		if !strings.Contains(text, keyA.String()) && name != "metrics" && name != "errors" {
			t.Errorf("the %s hold no trace of the run: the search there proves nothing", name)
		}
		for _, s := range sec.all() {
			if s.found([]byte(text)) {
				t.Errorf("the %s hold a %s (%.6s…)", name, s.kind, s.value)
			}
		}
	}

	// The bus.
	var tokenReplies, rotatedEvents int
	for _, m := range msgs {
		if m.Header.Get(baitHeader) != "" {
			continue // the careless runtime's own messages
		}
		raw := m.bytes()
		register := strings.HasPrefix(m.Subject, o.Subj.Prefix()+".register.")
		for _, s := range sec.all() {
			if s.kind == kindBait || !s.found(raw) {
				continue
			}
			switch {
			case register:
			case s.kind != kindAccess:
				t.Errorf("a message on %s (reply %s) holds a %s (%.6s…)", m.Subject, m.Reply, s.kind, s.value)
			case strings.HasPrefix(m.Subject, o.Subj.Prefix()+".rotated."):
				rotatedEvents++
			case tap.isTokenReply(m.Subject):
				tokenReplies++
			default:
				t.Errorf("a message on %s (reply %s) holds an access token (%.6s…); only auth.rotated and auth.token replies may", m.Subject, m.Reply, s.value)
			}
		}
	}
	t.Logf("wiretap: %d messages; access tokens in %d auth.rotated events and %d auth.token replies",
		len(msgs), rotatedEvents, tokenReplies)
	if rotatedEvents == 0 || tokenReplies == 0 {
		t.Error("the wiretap saw no access token where one belongs: the search there proves nothing")
	}

	// The store on disk, after the server has flushed and stopped.
	storeDir := o.Srv.StoreDir()
	o.Srv.Shutdown()
	o.Srv.WaitForShutdown()
	var files, size int
	var fingerprintSeen bool
	err = filepath.WalkDir(storeDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		size += len(raw)
		rel, _ := filepath.Rel(storeDir, path)
		fingerprintSeen = fingerprintSeen || bytes.Contains(raw, []byte(v2.Fingerprint))
		for _, s := range sec.all() {
			if s.kind == kindBait || !s.found(raw) {
				continue
			}
			t.Errorf("store file %s holds a %s (%.6s…)", rel, s.kind, s.value)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !fingerprintSeen {
		t.Errorf("no store file holds the fingerprint %s: the %d files (%d bytes) were not what the search assumes (compressed, encrypted?)", v2.Fingerprint, files, size)
	}
	t.Logf("store: %d files, %d bytes searched; %d refresh tokens, %d client secrets, %d access tokens looked for (plain and base64)",
		files, size, len(sec.refreshTokens), len(sec.clientSecrets), len(sec.accessTokens))
}

// baitHeader marks the messages the test publishes with a secret in them
// on purpose.
const baitHeader = "Canary-Bait"

const (
	kindRefresh = "refresh token"
	kindClient  = "client secret"
	kindAccess  = "access token"
	kindBait    = "access token sent in a malformed 401"
)

// secrets collects every secret value of a run.
type secrets struct {
	refreshTokens, clientSecrets, accessTokens, bait []string
}

func (s *secrets) add(list *[]string, v string) {
	if v != "" && !slices.Contains(*list, v) {
		*list = append(*list, v)
	}
}

func (s *secrets) addTokens(access, refresh string) {
	s.add(&s.accessTokens, access)
	s.add(&s.refreshTokens, refresh)
}

func (s *secrets) all() []canary {
	var out []canary
	for _, l := range []struct {
		kind string
		vs   []string
	}{{kindRefresh, s.refreshTokens}, {kindClient, s.clientSecrets}, {kindAccess, s.accessTokens}, {kindBait, s.bait}} {
		for _, v := range l.vs {
			out = append(out, newCanary(l.kind, v))
		}
	}
	return out
}

// canary is one secret value and the forms it could take in a channel:
// plain, and base64 (standard or URL alphabet) at any of the three byte
// alignments, since JetStream API replies and JSON []byte fields carry
// payloads base64-encoded.
type canary struct {
	kind, value string
	forms       [][]byte
}

func newCanary(kind, v string) canary {
	c := canary{kind: kind, value: v, forms: [][]byte{[]byte(v)}}
	for skip := range 3 {
		part := v[skip:]
		part = part[:len(part)/3*3]
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
			c.forms = append(c.forms, []byte(enc.EncodeToString([]byte(part))))
		}
	}
	return c
}

func (c canary) found(b []byte) bool {
	for _, f := range c.forms {
		if bytes.Contains(b, f) {
			return true
		}
	}
	return false
}

// tapped is one message the wiretap saw.
type tapped struct {
	Subject, Reply string
	Header         nats.Header
	Data           []byte
}

// bytes is everything of the message a secret could hide in.
func (m tapped) bytes() []byte {
	var b bytes.Buffer
	b.WriteString(m.Subject + " " + m.Reply + "\n")
	for k, vs := range m.Header {
		b.WriteString(k + ": " + strings.Join(vs, ", ") + "\n")
	}
	b.Write(m.Data)
	return b.Bytes()
}

// wiretap records every message on the server, from its own connection,
// and makes auth.token requests whose replies it can tell apart.
type wiretap struct {
	nc  *nats.Conn
	sub *nats.Subscription
	mu  sync.Mutex
	got []tapped
	// inboxes of the test's own auth.token requests
	tokenInboxes map[string]bool
}

func newWiretap(t *testing.T, b *fleet.Fleet) *wiretap {
	t.Helper()
	nc, err := nats.Connect(b.Srv.ClientURL(), nats.Name("wiretap"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	w := &wiretap{nc: nc, tokenInboxes: map[string]bool{}}
	w.sub, err = nc.Subscribe(">", func(m *nats.Msg) {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.got = append(w.got, tapped{m.Subject, m.Reply, m.Header, slices.Clone(m.Data)})
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.sub.SetPendingLimits(-1, -1); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return w
}

// request sends an empty auth.token request from the tap's connection and
// returns the reply's error code (empty on success) and body.
func (w *wiretap) request(t *testing.T, subject string) (code string, body []byte) {
	t.Helper()
	inbox := nats.NewInbox()
	sub, err := w.nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	w.mu.Lock()
	w.tokenInboxes[inbox] = true
	w.mu.Unlock()
	if err := w.nc.PublishRequest(subject, inbox, nil); err != nil {
		t.Fatal(err)
	}
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	return m.Header.Get("Nats-Service-Error-Code"), m.Data
}

func (w *wiretap) isTokenReply(subject string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.tokenInboxes[subject]
}

// stop ends the tap once everything sent so far has arrived, and returns
// what it saw.
func (w *wiretap) stop(t *testing.T) []tapped {
	t.Helper()
	if err := w.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := w.sub.Drain(); err != nil {
		t.Fatal(err)
	}
	fleet.Eventually(t, 10*time.Second, "the wiretap drained", func() bool { return !w.sub.IsValid() })
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.got)
}

// spanTexts is every text a span carries: name, status, attributes, events
// and links.
func spanTexts(spans []trace.ReadOnlySpan) []string {
	var texts []string
	for _, s := range spans {
		texts = append(texts, s.Name(), s.Status().Description)
		texts = append(texts, kvTexts(s.Attributes())...)
		for _, ev := range s.Events() {
			texts = append(texts, ev.Name)
			texts = append(texts, kvTexts(ev.Attributes)...)
		}
		for _, l := range s.Links() {
			texts = append(texts, kvTexts(l.Attributes)...)
		}
	}
	return texts
}

func mustRing(t *testing.T, id string, fill byte) *kv.KeyRing {
	t.Helper()
	r, err := kv.NewKeyRing(id, map[string][]byte{id: bytes.Repeat([]byte{fill}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// An authorization server that echoes the refresh token in its
// error_description (some do, in their "invalid refresh token <value>"
// messages): the description goes on in auth.needs_reauth, which the
// AUTH_REAUTH stream keeps for 30 days, and into the stored record, so the
// pool scrubs the credential's secrets from it first.
func TestCanaryServerEchoesRefreshToken(t *testing.T) {
	o := setupObserved(t)
	o.start(t, 1, nil)
	key := fleet.MustKey(t, "acme.echo.github")
	tok := o.AS.Issue(fleet.ClientID)
	o.Register(t, key, tok, nil)
	w := o.Watch(t, key)
	o.AS.Fail(1, http.StatusBadRequest, `{"error":"invalid_grant","error_description":"refresh token `+tok.RefreshToken+` is not valid"}`, nil)
	o.publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	ev := w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	o.Settled(t)
	if strings.Contains(ev.NeedsReauth.ErrorDescription, tok.RefreshToken) {
		t.Error("auth.needs_reauth carries the refresh token the server echoed")
	}
	if strings.Contains(o.Cred(t, key).Description, tok.RefreshToken) {
		t.Error("the stored record keeps the refresh token the server echoed, in plain text")
	}
}
