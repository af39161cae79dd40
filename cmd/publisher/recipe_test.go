package main

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
)

// Done-when: in a storm where most runtimes report after the rotation,
// every "publisher 401 --wait" gets its answer at once. The early reports
// arrive while the refresh is held in the token endpoint; the late ones
// report the same refused token after the rotation, and the stream drops
// them as duplicates, so no refresher announces anything for them. With
// --wait and --recheck at an hour, a publisher that did not ask auth.token
// right after its report would hang until the test's deadline and fail.
func TestLate401WaitIsAnsweredAtOnce(t *testing.T) {
	t.Parallel()
	b := setup(t)
	key := "acme.storm.github"
	tok := b.AS.Issue(fleet.ClientID)
	b.register(t, key, tok)
	inCall, release := make(chan struct{}), make(chan struct{})
	var called, released sync.Once
	b.AS.OnToken(func(*http.Request) {
		called.Do(func() { close(inCall) })
		<-release
	})
	unblock := func() { released.Do(func() { close(release) }) }
	t.Cleanup(unblock) // the server cannot close while a call is blocked
	w := b.Watch(t, fleet.MustKey(t, key))

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	type answer struct {
		who string
		r   result
	}
	answers := make(chan answer, 64)
	var wg sync.WaitGroup
	report := func(who string) {
		wg.Go(func() {
			answers <- answer{who, runCmd(t, ctx, "", "--nats-url", b.url, "401", "--access-token", tok.AccessToken,
				"--runtime", who, "--wait", "1h", "--recheck", "1h", "--json", key)}
		})
	}
	const early, late = 3, 20
	for i := range early {
		report(fmt.Sprintf("early-%d", i))
	}
	select {
	case <-inCall: // the first report's refresh is in the token endpoint
	case <-ctx.Done():
		t.Fatal("the early reports caused no token-endpoint call")
	}
	unblock()
	v2 := w.WaitFor(t, "auth.rotated v2", fleet.RotatedVersion(2)).Rotated
	for i := range late {
		report(fmt.Sprintf("late-%d", i))
	}
	wg.Wait()
	close(answers)
	dups := 0
	for a := range answers {
		if a.r.code != 0 {
			t.Errorf("%s: exit %d\nstdout: %s\nstderr: %s", a.who, a.r.code, a.r.out, a.r.errOut)
			continue
		}
		res := mustJSON[publishResult](t, a.r.out)
		if res.Outcome == nil || res.Outcome.Type != events.TypeRotated || res.Outcome.Version != 2 || res.Outcome.Fingerprint != v2.Fingerprint {
			t.Errorf("%s: outcome %+v, want the rotation to version 2", a.who, res.Outcome)
		}
		if res.Duplicate {
			dups++
		}
	}
	if dups < late {
		t.Errorf("%d reports were dropped as duplicates, want at least the %d late ones: the test did not report after the rotation", dups, late)
	}
	b.Settled(t)
	if n := b.AS.Calls(); n != 1 {
		t.Errorf("token-endpoint calls = %d, want exactly 1", n)
	}
	if n := b.AS.Reuses(); n != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", n)
	}
}
