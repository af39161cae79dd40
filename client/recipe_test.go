package client_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/authbus/authbus/client"
	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
)

// never is a wait bound and a recheck interval far beyond any test's
// deadline: a runtime that depended on either to get its answer hangs
// until the test's context ends, and fails.
const never = time.Hour

// Done-when: in a storm where most runtimes report after the rotation,
// every runtime gets an answer at once. The early runtimes report while the
// refresh is held in the token endpoint and get the auth.rotated event. The
// late ones report the same refused token after the rotation: the stream
// drops their reports as duplicates, so no refresher announces anything for
// them, and only the auth.token request right after the report can answer
// them. With the event wait and the re-asks set to an hour, a runtime that
// did not ask at once would hang until the test's deadline.
func TestLateReportsAreAnsweredAtOnce(t *testing.T) {
	b := setup(t, nil)
	fp := events.Fingerprint(b.tok.AccessToken)
	inCall, release := make(chan struct{}), make(chan struct{})
	var called, released sync.Once
	b.f.AS.OnToken(func(*http.Request) {
		called.Do(func() { close(inCall) })
		<-release
	})
	unblock := func() { released.Do(func() { close(release) }) }
	t.Cleanup(unblock) // the server cannot close while a call is blocked
	w := b.f.Watch(t, b.key)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	opts := func(name string) []client.Option {
		return []client.Option{client.WithRuntime(name), client.WithWaitTimeout(never), client.WithRecheckInterval(never)}
	}
	type answer struct {
		who string
		tok events.Rotated
		// notDup: the report was stored, not dropped as a duplicate.
		// Only the late runtimes that report with Report401 say.
		notDup bool
		err    error
	}
	answers := make(chan answer, 64)
	var wg sync.WaitGroup
	const early, late = 5, 40
	for i := range early {
		src, _ := b.newSource(t, opts(fmt.Sprintf("early-%d", i))...)
		wg.Go(func() {
			tok, err := src.Renew(ctx, client.Refusal{Fingerprint: fp, URL: b.api.URL})
			answers <- answer{who: fmt.Sprintf("early-%d", i), tok: tok, err: err}
		})
	}
	select {
	case <-inCall: // the first report's refresh is in the token endpoint
	case <-ctx.Done():
		t.Fatal("the early reports caused no token-endpoint call")
	}
	unblock()
	v2 := w.WaitFor(t, "auth.rotated v2", fleet.RotatedVersion(2)).Rotated

	for i := range late {
		who := fmt.Sprintf("late-%d", i)
		src, _ := b.newSource(t, opts(who)...)
		wg.Go(func() {
			a := answer{who: who}
			if i%2 == 0 {
				// As the publisher CLI does: report, then wait.
				var pub client.Published
				if pub, a.err = src.Report401(ctx, client.Refusal{Fingerprint: fp}); a.err == nil {
					a.notDup = !pub.Duplicate
					a.tok, a.err = src.Replacement(ctx, fp)
				}
			} else {
				a.tok, a.err = src.Renew(ctx, client.Refusal{Fingerprint: fp})
			}
			answers <- a
		})
	}
	wg.Wait()
	close(answers)
	n := 0
	for a := range answers {
		n++
		switch {
		case a.err != nil:
			t.Errorf("%s: %v", a.who, a.err)
		case a.tok.Fingerprint != v2.Fingerprint || a.tok.Version != 2:
			t.Errorf("%s: got version %d fingerprint %s, want version 2 %s", a.who, a.tok.Version, a.tok.Fingerprint, v2.Fingerprint)
		case a.notDup:
			t.Errorf("%s: its report was not a duplicate: the test did not report after the rotation", a.who)
		}
	}
	if n != early+late {
		t.Errorf("%d answers, want %d", n, early+late)
	}
	b.f.Settled(t)
	if c := b.f.AS.Calls(); c != 1 {
		t.Errorf("token-endpoint calls = %d, want exactly 1", c)
	}
	if r := b.f.AS.Reuses(); r != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", r)
	}
}

// Replacement of a token that needs a new login ends with the
// *NeedsReauthError; of a key that is not registered, with ErrNotFound; a
// bad Refusal is refused before anything is sent.
func TestRenewOutcomes(t *testing.T) {
	b := setup(t, nil)
	src, _ := b.newSource(t, client.WithWaitTimeout(never), client.WithRecheckInterval(never))
	b.f.AS.Revoke(b.tok.RefreshToken)
	_, err := src.Renew(context.Background(), client.Refusal{Fingerprint: events.Fingerprint(b.tok.AccessToken)})
	var nre *client.NeedsReauthError
	if !errors.As(err, &nre) || nre.Reason != "invalid_grant" {
		t.Fatalf("Renew of a revoked grant: %v; want a *NeedsReauthError invalid_grant", err)
	}

	other, err := client.New(b.f.NC, "acme.nobody.api")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.Replacement(context.Background(), events.Fingerprint("x")); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("Replacement for an unknown key: %v; want ErrNotFound", err)
	}
	if _, err := other.Report401(context.Background(), client.Refusal{Fingerprint: "not-hex"}); !errors.Is(err, events.ErrInvalidEvent) {
		t.Errorf("Report401 with a bad fingerprint: %v; want events.ErrInvalidEvent", err)
	}
}

// FetchToken is one auth.token request; its errors are the Source's.
func TestFetchToken(t *testing.T) {
	b := setup(t, nil)
	tok, err := client.FetchToken(context.Background(), b.f.NC, b.key.String())
	if err != nil || tok.AccessToken != b.tok.AccessToken || tok.Version != 1 {
		t.Fatalf("FetchToken: version %d err %v; want the registered token", tok.Version, err)
	}
	if _, err := client.FetchToken(context.Background(), b.f.NC, "acme.nobody.api"); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("FetchToken of an unknown key: %v; want ErrNotFound", err)
	}
	if _, err := client.FetchToken(context.Background(), b.f.NC, "acme..api"); !errors.Is(err, events.ErrInvalidKey) {
		t.Errorf("FetchToken of a bad key: %v; want events.ErrInvalidKey", err)
	}
}

// A Watcher sees the events of the keys its patterns match, decoded, and
// refuses a pattern that reaches beyond the key tokens.
func TestWatcher(t *testing.T) {
	b := setup(t, nil)
	w, err := client.Watch(b.f.NC, []string{"acme.>"}, []events.Type{events.TypeRotated, events.Type401})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	b.f.Publish401(t, b.key, events.Fingerprint(b.tok.AccessToken), "test", true)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var types []events.Type
	for len(types) < 2 {
		ev, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("Next: %v (after %v)", err, types)
		}
		if ev.Subject != b.key.String() {
			t.Errorf("event for %s, want %s", ev.Subject, b.key)
		}
		types = append(types, ev.Type)
	}
	if types[0] != events.Type401 || types[1] != events.TypeRotated {
		t.Errorf("events %v, want the 401 and then its rotation", types)
	}
	w.Close()
	if _, err := w.Next(ctx); !errors.Is(err, client.ErrClosed) {
		t.Errorf("Next after Close: %v; want ErrClosed", err)
	}
	for _, bad := range []string{"acme.>.x", "a.b.c.d", "acme", "acme.bob", "ac me.>"} {
		if _, err := client.Watch(b.f.NC, []string{bad}, []events.Type{events.TypeRotated}); !errors.Is(err, client.ErrInvalidPattern) {
			t.Errorf("Watch(%q): %v; want ErrInvalidPattern", bad, err)
		}
	}
}
