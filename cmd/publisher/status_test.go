package main

import (
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/fleet"
)

// While a refresh fails and is retried, status says why and when the next
// attempt is due, in every form, although the state is still active.
func TestStatusShowsTheLastFailureAndTheRetry(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const key = "acme.alice.github"
	tok := b.AS.Issue(fleet.ClientID)
	b.register(t, key, tok)
	b.AS.SetDown(true)
	b.publisher(t, "", "401", "--access-token", tok.AccessToken, key).want(t, 0)
	fleet.Eventually(t, 30*time.Second, "a failed refresh recorded", func() bool {
		return b.LastFailure(t, fleet.MustKey(t, key)) != nil
	})

	r := b.publisher(t, "", "status", key).want(t, 0)
	for _, want := range []string{"state:", "active", "last failure:", "failed", "token endpoint unreachable: ", "retry:", "#"} {
		if !strings.Contains(r.out, want) {
			t.Errorf("status %s does not show %q:\n%s", key, want, r.out)
		}
	}
	r = b.publisher(t, "", "status", "acme").want(t, 0)
	for _, want := range []string{"RETRY", "active (failing)", key + ": attempt ", "token endpoint unreachable: "} {
		if !strings.Contains(r.out, want) {
			t.Errorf("status acme does not show %q:\n%s", want, r.out)
		}
	}
	list := mustJSON[[]credStatus](t, b.publisher(t, "", "status", "--json", key).want(t, 0).out)
	if len(list) != 1 || list[0].LastFailure == nil || list[0].LastFailure.Attempt < 1 ||
		!strings.HasPrefix(list[0].LastFailure.Cause, "token endpoint unreachable: ") || list[0].LastFailure.RetryAt.IsZero() {
		t.Errorf("status --json: want last_failure with attempt, cause and retry_at: %+v", list)
	}
	mustNotContain(t, "status", r.out, tok.AccessToken, tok.RefreshToken, fleet.ClientSecret)
}

func TestAgoKeepsEverySecond(t *testing.T) {
	t.Parallel()
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	for d, want := range map[time.Duration]string{
		4*time.Minute + 30*time.Second: "in 4m30s",
		4 * time.Minute:                "in 4m",
		-(time.Hour + 5*time.Minute):   "1h5m ago",
		59 * time.Second:               "in 59s",
		72 * time.Hour:                 "in 3d",
	} {
		if got := ago(now.Add(d), now); got != want {
			t.Errorf("ago(%v) = %q, want %q", d, got, want)
		}
	}
}
