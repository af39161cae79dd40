package kv

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/natstest"
)

// The Inspector shows what a person may see of credentials, lease and last
// failure included, without a seal key and without any token or secret.
func TestInspectorNeedsNoSealKey(t *testing.T) {
	t.Parallel()
	s := natstest.RunServer(t)
	_, js := natstest.JetStream(t, s)
	subj, _ := events.NewSubjects("inspect")
	store, err := NewStore(t.Context(), js, StoreConfig{Bucket: subj.CredentialsBucket()}, testRing(t))
	if err != nil {
		t.Fatal(err)
	}
	leases, err := NewLeases(t.Context(), js, LeaseConfig{Bucket: subj.LeasesBucket(), TTL: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	a, b := testCredential(t, "acme.alice.github"), testCredential(t, "acme.bob.github")
	a.TokenEndpoint = "https://user:pw@idp.example/token?client_secret=q-secret"
	for _, c := range []*Credential{a, b, testCredential(t, "globex.alice.github")} {
		if _, err := store.Create(t.Context(), c); err != nil {
			t.Fatal(err)
		}
	}
	failures, err := NewFailures(t.Context(), js, FailuresConfig{Bucket: subj.FailuresBucket()})
	if err != nil {
		t.Fatal(err)
	}
	// alice's failure is of the generation in force; bob's of an older one,
	// which status must not show.
	now := time.Now().UTC()
	for _, f := range []struct {
		c *Credential
		f Failure
	}{
		{a, Failure{Version: a.Version, Fingerprint: a.Fingerprint, At: now, Cause: "token endpoint unreachable: no such host", Attempt: 3, RetryAt: now.Add(time.Minute)}},
		{b, Failure{Version: b.Version - 1, Fingerprint: "fedcba9876543210", At: now, Cause: "old", Attempt: 1}},
	} {
		if err := failures.Record(t.Context(), f.c.Key, f.f); err != nil {
			t.Fatal(err)
		}
	}
	lease, err := leases.Claim(t.Context(), b.Key, "refresher-7", Read{})
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release(t.Context())

	in, err := OpenInspector(t.Context(), js, subj)
	if err != nil {
		t.Fatal(err)
	}
	infos, err := in.Inspect(t.Context(), "acme.>")
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 2 || infos[0].Key != a.Key || infos[1].Key != b.Key {
		t.Fatalf("Inspect(acme.>) = %d credentials %+v; want alice and bob of acme, in order", len(infos), infos)
	}
	ia, ib := infos[0], infos[1]
	if ia.Version != a.Version || ia.Fingerprint != a.Fingerprint || !ia.HasRefreshToken || ia.LeaseHolder != "" ||
		ia.LastFailure == nil || ia.LastFailure.Attempt != 3 || ia.TokenEndpoint != "https://idp.example/token" {
		t.Errorf("alice: %+v", ia)
	}
	if ib.LeaseHolder != "refresher-7" || ib.LastFailure != nil || ib.Revision == 0 {
		t.Errorf("bob: %+v", ib)
	}
	shown := fmt.Sprintf("%+v %#v", infos, infos)
	for _, secret := range []string{a.AccessToken.Reveal(), a.RefreshToken.Reveal(), a.ClientSecret.Reveal(), "q-secret", "pw@"} {
		if secret != "" && strings.Contains(shown, secret) {
			t.Errorf("the inspected credentials show a secret (%.6s…)", secret)
		}
	}

	other, _ := events.NewSubjects("other")
	if _, err := OpenInspector(t.Context(), js, other); err == nil || !strings.Contains(err.Error(), "OTHER_CREDENTIALS not found") {
		t.Errorf("OpenInspector of a prefix no refresher used: %v", err)
	}
}
