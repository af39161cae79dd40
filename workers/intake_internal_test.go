package workers

import (
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

func TestReplyAllowed(t *testing.T) {
	for _, c := range []struct {
		reply, tenant string
		ok            bool
	}{
		{"_INBOX.abc.def", "acme", true},
		{"_INBOX_acme.abc", "acme", true},
		{"_INBOX_acme.abc.def", "acme", true},
		{"_INBOX_bravo.abc", "acme", false}, // another tenant's inbox
		{"_INBOX_acmex.abc", "acme", false}, // a tenant whose name starts with acme's
		{"_INBOX_acme", "acme", false},      // the prefix alone
		{"_INBOX.", "acme", false},          // nothing after the prefix
		{"_INBOX_.x", "", false},            // no tenant: only the default inbox
		{"_INBOX.x", "", true},              //
		{"$KV.AUTH_CREDENTIALS.b.u.s", "acme", false},
		{"$JS.API.STREAM.PURGE.AUTH_EVENTS", "acme", false},
		{"auth.rotated.bravo.u.s", "acme", false},
		{"", "acme", false},
	} {
		if got := replyAllowed(c.reply, c.tenant); got != c.ok {
			t.Errorf("replyAllowed(%q, %q) = %v, want %v", c.reply, c.tenant, got, c.ok)
		}
	}
}

// Over its burst a tenant's events are not refused: they go to the slow
// lane. Tenants are independent, and full buckets are dropped once the map
// grows.
func TestTenantLimits(t *testing.T) {
	l := newTenantLimits(0.001, 3) // refills one token every 1000 s: none in this test
	var taken int
	for range 10 {
		if l.allow("acme") {
			taken++
		}
	}
	if taken != 3 {
		t.Fatalf("acme took %d of 10 into the work lane, want its burst of 3", taken)
	}
	if !l.allow("bravo") {
		t.Fatal("bravo was limited by acme's flood")
	}
	// The map stays as small as the tenants reporting right now.
	l3 := newTenantLimits(1e9, 1)
	for i := range 2 * tenantLimitsSweep {
		l3.allow(fmt.Sprint("t", i))
	}
	if n := len(l3.m); n > tenantLimitsSweep+1 {
		t.Errorf("%d buckets kept for %d tenants that reported once, want at most %d", n, 2*tenantLimitsSweep, tenantLimitsSweep+1)
	}
}

func TestRecentIDs(t *testing.T) {
	r := newRecentIDs(time.Hour, 3)
	r.put("a", jetstream.PubAck{Stream: "S", Sequence: 1})
	ack, ok := r.get("a")
	if !ok || ack.Sequence != 1 || !ack.Duplicate {
		t.Fatalf("get a = %+v %v, want sequence 1 as a duplicate", ack, ok)
	}
	for i, id := range []string{"b", "c", "d"} {
		r.put(id, jetstream.PubAck{Sequence: uint64(i + 2)})
	}
	if _, ok := r.get("a"); ok {
		t.Error("the oldest id outlived the size bound")
	}
	if _, ok := r.get("d"); !ok {
		t.Error("the newest id is gone")
	}
	short := newRecentIDs(time.Nanosecond, 3)
	short.put("x", jetstream.PubAck{})
	if _, ok := short.get("x"); ok {
		t.Error("an id outlived the duplicate window")
	}
}

func TestTenantOf(t *testing.T) {
	for subject, want := range map[string]string{
		"auth.work.401.acme.alice.github": "acme",
		"auth.slow.expiring.bravo.bob.x":  "bravo",
		"acme.auth.work.401.tenant-1.u.s": "tenant-1",
		"x":                               "x",
	} {
		if got := tenantOf(subject); got != want {
			t.Errorf("tenantOf(%q) = %q, want %q", subject, got, want)
		}
	}
}
