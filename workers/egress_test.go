package workers_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
	"github.com/authbus/authbus/workers/egress"
)

// A registration naming a token endpoint the policy refuses gets a 400
// that names the field and the fix; nothing is stored.
func TestRegisterRefusesTokenHost(t *testing.T) {
	for _, c := range []struct {
		name   string
		policy egress.Policy
		want   string
	}{
		{"loopback by default", egress.Policy{}, "loopback"},
		{"outside the allow-list", egress.Policy{Allowed: []string{"*.okta.com"}, AllowLoopback: true}, "allowed-token-hosts"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := fleet.Setup(t)
			b.StartPools(t, 1, func(cfg *workers.Config) { cfg.TokenHosts = c.policy })
			key := fleet.MustKey(t, "acme.alice.github")
			_, err := b.TryRegister(key, b.AS.Issue(fleet.ClientID), nil)
			if err == nil || !strings.HasPrefix(err.Error(), "400") || !strings.Contains(err.Error(), "token_endpoint") || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("register: err %v, want a 400 naming token_endpoint and %q", err, c.want)
			}
			if _, _, err := b.Store.Get(context.Background(), key); err == nil {
				t.Error("a refused registration was stored")
			}
		})
	}
}

// The check runs at connect time too: a credential registered while its
// endpoint was allowed (or while its name resolved elsewhere) is not called
// once the policy refuses it. The refusal is transient and logged, never
// needs_reauth: the refresh token was not sent, and only an operator can
// fix the configuration.
func TestTokenHostRefusedAtConnectTime(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil) // loopback allowed
	key := fleet.MustKey(t, "acme.alice.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	b.StopPools(t)

	b.StartPools(t, 1, func(cfg *workers.Config) {
		cfg.TokenHosts = egress.Policy{} // loopback refused
		cfg.MaxDeliver = 3
	})
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	fleet.Eventually(t, 20*time.Second, "the refusal is logged", func() bool {
		return len(b.Logs.Records(map[string]string{"msg": "token endpoint refused at connect time"})) > 0
	})
	b.Settled(t)
	if n := b.AS.Calls(); n != 0 {
		t.Errorf("token-endpoint calls = %d, want 0 (the dial must be refused)", n)
	}
	c := b.Cred(t, key)
	if c.State != kv.StateActive || c.Version != 1 {
		t.Errorf("credential state %s version %d, want active version 1", c.State, c.Version)
	}
	if got := b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "transient"}); len(got) == 0 {
		t.Error("no event was settled as transient")
	}
}
