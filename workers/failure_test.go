package workers_test

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
)

// A refresh that fails and is retried leaves its cause and the pending
// retry where status reads them and in the log line, and the next
// generation no longer shows them.
func TestFailedRefreshIsRecordedUntilTheNextGeneration(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) { c.RetryBase, c.RetryMax = 200*time.Millisecond, 200*time.Millisecond })
	key := fleet.MustKey(t, "acme.alice.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	w := b.Watch(t, key)

	b.AS.SetDown(true)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt-1", true)
	var f *kv.Failure
	fleet.Eventually(t, 30*time.Second, "the failed refresh is in the record", func() bool {
		f = b.LastFailure(t, key)
		return f != nil
	})
	if !strings.HasPrefix(f.Cause, "token endpoint unreachable: ") || strings.Contains(f.Cause, b.AS.BaseURL()) {
		t.Errorf("cause %q: want what kept the call from being answered, without the URL", f.Cause)
	}
	if f.Attempt < 1 || f.At.IsZero() || !f.RetryAt.After(f.At) {
		t.Errorf("failure %+v: want the attempt and a retry after it", *f)
	}
	if c := b.Cred(t, key); c.State != kv.StateActive || c.Version != 1 {
		t.Errorf("state %s version %d: a transient failure changes neither", c.State, c.Version)
	}
	fleet.Eventually(t, 10*time.Second, "the log line carries the cause and the retry", func() bool {
		for _, rec := range b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "transient"}) {
			if d, _ := rec["detail"].(string); strings.HasPrefix(d, "token endpoint unreachable: ") && rec["retry_in"] != nil && rec["attempt"] != nil {
				return true
			}
		}
		return false
	})

	b.AS.SetDown(false)
	w.WaitFor(t, "the rotation once the endpoint is back", fleet.RotatedVersion(2))
	if f := b.LastFailure(t, key); f != nil {
		t.Errorf("version 2 shows the failure of version 1: %+v", *f)
	}
	// The note is of version 1 and stays until it ages out; it is the
	// generation in force that decides whether status shows it.
	if f.Version != 1 || f.Fingerprint != events.Fingerprint(tok.AccessToken) {
		t.Errorf("the failure names generation %d %s; want version 1 and its fingerprint", f.Version, f.Fingerprint)
	}
}

// A refusal names its cause: here, nothing listens on the token
// endpoint's port.
func TestFailedRefreshNamesARefusedConnection(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) { c.RetryBase, c.RetryMax = time.Minute, time.Minute })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + l.Addr().String() + "/token"
	l.Close()
	key := fleet.MustKey(t, "acme.alice.slack")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, func(r *events.RegisterRequest) { r.TokenEndpoint, r.Issuer = closed, "" })
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt-1", true)
	var f *kv.Failure
	fleet.Eventually(t, 30*time.Second, "the failed refresh is in the record", func() bool {
		f = b.LastFailure(t, key)
		return f != nil
	})
	if !strings.Contains(f.Cause, "connection refused") || f.Attempt != 1 {
		t.Errorf("failure %+v: want attempt 1 refused", *f)
	}
	// The retry is a minute away; it is what the record says.
	if d := f.RetryAt.Sub(f.At); d < 30*time.Second {
		t.Errorf("retry %v after the failure; want the backoff of about a minute", d)
	}
}
