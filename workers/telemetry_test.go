package workers_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
)

// Done-when 4: no token or secret reaches a span name, attribute, event,
// link or status, nor a metric attribute, on the paths that handle them:
// registration, rotation, a transient failure, and needs_reauth.
func TestNoSecretInTelemetry(t *testing.T) {
	o := setupObserved(t)
	o.start(t, 2, nil)
	key := fleet.MustKey(t, "acme.canary.github")
	tok := o.AS.Issue(fleet.ClientID)
	o.Register(t, key, tok, nil)
	w := o.Watch(t, key)
	o.AS.Fail(1, http.StatusServiceUnavailable, `{"error":"temporarily_unavailable"}`, nil)
	o.publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	rot := w.WaitFor(t, "rotation", fleet.RotatedVersion(2))
	newRT := o.Cred(t, key).RefreshToken.Reveal()
	o.AS.Revoke(newRT)
	o.publish401(t, key, rot.Rotated.Fingerprint, "rt", true)
	w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	o.Settled(t)
	fleet.Eventually(t, 10*time.Second, "the needs_reauth process span ended", func() bool {
		return len(o.ended(func(s sdktrace.ReadOnlySpan) bool { return attrOf(s, "authbus.outcome") == "needs_reauth" })) > 0
	})

	canaries := []string{tok.AccessToken, tok.RefreshToken, rot.Rotated.AccessToken, newRT, fleet.ClientSecret}
	var texts []string
	for _, s := range o.spans.Ended() {
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
	rm := collect(t, o.reader)
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			texts = append(texts, fmt.Sprintf("%+v", m.Data))
		}
	}
	all := strings.Join(texts, "\n")
	if !strings.Contains(all, events.Fingerprint(tok.AccessToken)) || !strings.Contains(all, "POST") {
		t.Fatal("the telemetry checked does not hold the fingerprints and calls it should: the check would prove nothing")
	}
	for _, c := range canaries {
		if strings.Contains(all, c) {
			t.Errorf("a span or metric holds a secret (%.6s…)", c)
		}
	}
	if n := len(o.ended(func(s sdktrace.ReadOnlySpan) bool { return s.Status().Code == codes.Error })); n == 0 {
		t.Error("no span recorded the 503: the failure path was not checked")
	}
}

func kvTexts(kvs []attribute.KeyValue) []string {
	out := make([]string, 0, len(kvs))
	for _, kv := range kvs {
		out = append(out, string(kv.Key)+"="+kv.Value.Emit())
	}
	return out
}
