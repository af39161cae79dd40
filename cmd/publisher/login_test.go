package main

import (
	"context"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
)

// start runs a command line against the bundle's server in the background,
// for commands that wait for a person: stderr can be read while it runs.
func (b *bundle) start(t *testing.T, args ...string) (errOut *fleet.LogBuffer, done <-chan result) {
	t.Helper()
	_, errOut, done = b.startBoth(t, args...)
	return errOut, done
}

// startOut is start for a command that reports on stdout.
func (b *bundle) startOut(t *testing.T, args ...string) (out *fleet.LogBuffer, done <-chan result) {
	t.Helper()
	out, _, done = b.startBoth(t, args...)
	return out, done
}

func (b *bundle) startBoth(t *testing.T, args ...string) (out, errOut *fleet.LogBuffer, done <-chan result) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	out, errOut = &fleet.LogBuffer{}, &fleet.LogBuffer{}
	ch := make(chan result, 1)
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		code := run(ctx, append([]string{"--nats-url", b.url}, args...), strings.NewReader(""), out, errOut)
		ch <- result{code: code, out: out.String(), errOut: errOut.String()}
	}()
	t.Cleanup(func() {
		cancel()
		<-ended
	})
	return out, errOut, ch
}

// waitForMatch waits until re matches buf and returns the submatches.
func waitForMatch(t *testing.T, buf *fleet.LogBuffer, re *regexp.Regexp) []string {
	t.Helper()
	var m []string
	fleet.Eventually(t, 20*time.Second, "output matching "+re.String()+"; got:\n"+buf.String(), func() bool {
		m = re.FindStringSubmatch(buf.String())
		return m != nil
	})
	return m
}

func wait(t *testing.T, done <-chan result) result {
	t.Helper()
	select {
	case r := <-done:
		return r
	case <-time.After(30 * time.Second):
		t.Fatal("the command did not end within 30s")
		return result{}
	}
}

var authorizeURL = regexp.MustCompile(`(http://127\.0\.0\.1:\d+/authorize\?\S+)`)

// rotatesOnce reports a 401 for the credential's current token and checks
// that exactly one refresh follows.
func (b *bundle) rotatesOnce(t *testing.T, w *fleet.Watcher, key string, version int64) *kv.Credential {
	t.Helper()
	before := refreshCalls(b)
	cred := b.Cred(t, fleet.MustKey(t, key))
	b.publisher(t, "", "401", "--access-token", cred.AccessToken.Reveal(), key).want(t, 0)
	w.WaitFor(t, "auth.rotated of the refreshed token", fleet.RotatedVersion(version))
	b.Settled(t)
	if n := refreshCalls(b) - before; n != 1 {
		t.Errorf("%d refresh calls for one 401, want 1", n)
	}
	return b.Cred(t, fleet.MustKey(t, key))
}

func refreshCalls(b *bundle) int {
	n := 0
	for _, c := range b.AS.CallLog() {
		if c.GrantType == "refresh_token" {
			n++
		}
	}
	return n
}

// The test plays the person: it follows the printed authorization URL,
// approves on the consent page, and the redirect reaches login's loopback
// listener; the refreshers then refresh the registered credential.
func TestLoginWithBrowserRegistersAndRepairsNeedsReauth(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const key = "acme.login.github"
	w := b.Watch(t, fleet.MustKey(t, key))
	browser := authtest.Browser{Client: b.AS.Client()}
	login := func() result {
		t.Helper()
		errOut, done := b.start(t, "login", "--no-browser", "--issuer", b.AS.BaseURL(), "--client-id", fleet.ClientID,
			"--client-secret", fleet.ClientSecret, "--scope", "read", key)
		authURL := waitForMatch(t, errOut, authorizeURL)[1]
		u, _ := url.Parse(authURL)
		redirect := u.Query().Get("redirect_uri")
		if !regexp.MustCompile(`^http://127\.0\.0\.1:\d+/callback$`).MatchString(redirect) || u.Query().Get("code_challenge_method") != "S256" {
			t.Fatalf("authorization URL %s: want a loopback redirect and PKCE S256", authURL)
		}
		// A redirect without this login's state is ignored: login waits on.
		p, err := browser.Open(t.Context(), redirect+"?code=forged&state=wrong")
		if err != nil || p.Status != http.StatusBadRequest {
			t.Fatalf("forged redirect: %v %+v", err, p)
		}
		p, err = browser.Approve(t.Context(), authURL)
		if err != nil || p.Status != 200 || !strings.Contains(p.Body, "Logged in") {
			t.Fatalf("approve: %v %+v", err, p)
		}
		return wait(t, done).want(t, 0)
	}

	r := login()
	if !strings.HasPrefix(r.out, "registered "+key+": version 1, fingerprint ") {
		t.Errorf("login output %q", r.out)
	}
	cred := b.Cred(t, fleet.MustKey(t, key))
	if cred.TokenEndpoint != b.AS.TokenURL() || cred.ClientSecret.Reveal() != fleet.ClientSecret || cred.AuthStyle != events.AuthStyleBasic ||
		strings.Join(cred.Scopes, " ") != "read" || cred.RefreshToken.Reveal() != b.AS.CurrentRefreshToken(cred.AccessToken.Reveal()) {
		t.Errorf("registered %+v", cred)
	}
	if c := b.AS.CallLog()[0]; c.GrantType != "authorization_code" || c.Form.Get("code_verifier") == "" || c.Status != 200 {
		t.Errorf("the code exchange: %+v", c)
	}
	mustNotContain(t, "login output", r.out+r.errOut, cred.AccessToken.Reveal(), cred.RefreshToken.Reveal(), fleet.ClientSecret)

	cred = b.rotatesOnce(t, w, key, 2)

	// The grant ends at the server: the next 401 needs a person, and a
	// second login repairs it.
	b.AS.Revoke(cred.RefreshToken.Reveal())
	b.publisher(t, "", "401", "--access-token", cred.AccessToken.Reveal(), key).want(t, 0)
	w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	b.Settled(t)
	r = login()
	if !strings.HasPrefix(r.out, "registered "+key+": version 3") {
		t.Errorf("second login output %q", r.out)
	}
	if got := b.Cred(t, fleet.MustKey(t, key)); got.State != kv.StateActive {
		t.Errorf("after the second login the credential is %s", got.State)
	}
	b.rotatesOnce(t, w, key, 4)
}

// On a machine without a browser the test approves the user code on the
// verification page, as the person would on their phone.
func TestLoginWithDeviceCode(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.AS.AddClient("cli", "") // a public client: the device grant, no secret
	b.AS.SetDeviceInterval(time.Second)
	const key = "acme.device.github"
	w := b.Watch(t, fleet.MustKey(t, key))
	errOut, done := b.start(t, "login", "--device", "--issuer", b.AS.BaseURL(), "--client-id", "cli", key)
	m := waitForMatch(t, errOut, regexp.MustCompile(`open (\S+) and enter the code (\S+)`))
	if p, err := (authtest.Browser{Client: b.AS.Client()}).ApproveDevice(t.Context(), m[1], m[2]); err != nil || p.Status != 200 {
		t.Fatalf("approve %s at %s: %v", m[2], m[1], err)
	}
	r := wait(t, done).want(t, 0)
	if !strings.HasPrefix(r.out, "registered "+key+": version 1") {
		t.Errorf("login output %q", r.out)
	}
	cred := b.Cred(t, fleet.MustKey(t, key))
	if cred.AuthStyle != events.AuthStylePost || !cred.ClientSecret.IsZero() {
		t.Errorf("a public client registered with auth style %q and a secret: %v", cred.AuthStyle, !cred.ClientSecret.IsZero())
	}
	b.rotatesOnce(t, w, key, 2)
	last := b.AS.CallLog()[len(b.AS.CallLog())-1]
	if last.ClientID != "cli" || last.Form.Get("client_id") != "cli" || last.Form.Has("client_secret") || last.Status != 200 {
		t.Errorf("the refresh of a public client: %+v", last)
	}
}

func TestLoginRefusals(t *testing.T) {
	t.Parallel()
	b := setup(t)
	// A denied login ends with the server's answer; nothing is registered.
	errOut, done := b.start(t, "login", "--no-browser", "--issuer", b.AS.BaseURL(), "--client-id", fleet.ClientID, "acme.denied.github")
	if _, err := (authtest.Browser{Client: b.AS.Client()}).Deny(t.Context(), waitForMatch(t, errOut, authorizeURL)[1]); err != nil {
		t.Fatal(err)
	}
	r := wait(t, done).want(t, 1)
	if !strings.Contains(r.errOut, "refused the login: access_denied") {
		t.Errorf("denied login: %s", r.errOut)
	}
	b.publisher(t, "", "token", "acme.denied.github").want(t, 3)

	// No login within the timeout, and input refused before anyone logs in.
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--login-timeout", "200ms", "--no-browser"}, 1, "not approved within 200ms"},
		{[]string{"--issuer", "", "--no-browser"}, 2, "--issuer is required"},
		{[]string{"--auth-style", "digest"}, 2, "auth_style"},
		{[]string{"--issuer", "http://192.0.2.1"}, 2, "uses http; use https"},
		{[]string{"--login-timeout", "0s"}, 2, "--login-timeout"},
	} {
		args := append([]string{"login", "--issuer", b.AS.BaseURL(), "--client-id", fleet.ClientID}, tc.args...)
		r := b.publisher(t, "", append(args, "acme.x.github")...)
		if r.code != tc.code || !strings.Contains(r.errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr:\n%s\nwant exit %d and %q", tc.args, r.code, r.errOut, tc.code, tc.want)
		}
	}
	if b.AS.Calls() != 0 {
		t.Errorf("%d token calls, want none", b.AS.Calls())
	}
}
