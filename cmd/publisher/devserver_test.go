package main

import (
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
)

// The login command devserver prints runs as printed, against it, and the
// credential it registers rotates through the development server.
func TestDevserverPrintsALoginThatWorks(t *testing.T) {
	t.Parallel()
	b := setup(t)
	devOut, _ := b.startOut(t, "devserver", "--listen", "127.0.0.1:0", "--token-lifetime", "45s")
	m := waitForMatch(t, devOut, regexp.MustCompile(`(?m)^  (?:go run \./cmd/publisher|publisher) login (.+)$`))
	args := strings.Fields(m[1])
	if strings.Join(args[:2], " ") != "--nats-url "+b.url || args[len(args)-1] != devKey {
		t.Fatalf("printed login command %q: want the non-default --nats-url and the key %s", m[0], devKey)
	}
	w := b.Watch(t, fleet.MustKey(t, devKey))

	before := time.Now()
	errOut, done := b.start(t, append([]string{"login", "--no-browser"}, args...)...)
	if p, err := (authtest.Browser{}).Approve(t.Context(), waitForMatch(t, errOut, authorizeURL)[1]); err != nil || p.Status != 200 {
		t.Fatalf("approve: %v", err)
	}
	r := wait(t, done).want(t, 0)
	if !strings.HasPrefix(r.out, "registered "+devKey+": version 1") {
		t.Errorf("login output %q", r.out)
	}
	cred := b.Cred(t, fleet.MustKey(t, devKey))
	// The token was issued between before and the registration: it expires
	// --token-lifetime after a moment in between, however long that took.
	if earliest, latest := before.Add(45*time.Second).Truncate(time.Second), cred.ReceivedAt.Add(45*time.Second); cred.ExpiresAt.Before(earliest) || cred.ExpiresAt.After(latest) {
		t.Errorf("a development token expires at %v, want 45s after its issue, within [%v, %v]", cred.ExpiresAt, earliest, latest)
	}
	b.publisher(t, "", "401", "--access-token", cred.AccessToken.Reveal(), devKey).want(t, 0)
	w.WaitFor(t, "rotation", fleet.RotatedVersion(2))
	waitForMatch(t, devOut, regexp.MustCompile(`token call: refresh_token for client authbus-dev → 200`))
	if !strings.Contains(devOut.String(), "token call: authorization_code for client authbus-dev → 200") {
		t.Errorf("devserver did not log the login's code exchange:\n%s", devOut)
	}
	mustNotContain(t, "devserver output", devOut.String(), cred.AccessToken.Reveal(), cred.RefreshToken.Reveal())
}

func TestDevserverRefusals(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--listen", "0.0.0.0:9096"}, "not a loopback address"},
		{[]string{"--listen", ":9096"}, "not a loopback address"},
		{[]string{"--token-lifetime", "500ms"}, "--token-lifetime"},
		{[]string{"--reuse", "lenient"}, "--reuse"},
		{[]string{"extra"}, "takes no arguments"},
	} {
		r := runCmd(t, t.Context(), "", append([]string{"devserver"}, tc.args...)...)
		if r.code != 2 || !strings.Contains(r.errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr:\n%s\nwant exit 2 and %q", tc.args, r.code, r.errOut, tc.want)
		}
	}
}
