package authtest

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/oauth2"
)

func TestFailQueue(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken
	b.srv.Fail(2, 503, "", nil)
	b.srv.Fail(1, 429, `{"error":"rate_limited"}`, http.Header{"Retry-After": {"2"}})

	for range 2 {
		_, err := refresh(b.ctx, b.basic(), rt)
		wantAnswer(t, err, 503, "")
	}
	_, err := refresh(b.ctx, b.basic(), rt)
	if re := wantAnswer(t, err, 429, "rate_limited"); re.Response.Header.Get("Retry-After") != "2" {
		t.Errorf("Retry-After %q, want 2", re.Response.Header.Get("Retry-After"))
	}
	mustRefresh(t, b.ctx, b.basic(), rt) // failed calls spend nothing

	var got []string
	for _, c := range b.srv.CallLog() {
		got = append(got, http.StatusText(c.Status)+"/"+c.Error)
	}
	want := "Service Unavailable/ Service Unavailable/ Too Many Requests/rate_limited OK/"
	if strings.Join(got, " ") != want || b.srv.Calls() != 4 || b.srv.Reuses() != 0 {
		t.Errorf("call log %v, Calls %d, Reuses %d", got, b.srv.Calls(), b.srv.Reuses())
	}
}

func TestDown(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken
	// A first answer leaves a kept-alive connection: the failure must also
	// show on a reused connection, and the client must not retry the POST.
	_, err := b.basic().PasswordCredentialsToken(b.ctx, "u", "p")
	wantAnswer(t, err, 400, "unsupported_grant_type")

	b.srv.SetDown(true)
	for i := range 2 {
		_, err = refresh(b.ctx, b.basic(), rt)
		wantTransportError(t, err)
		if b.srv.Calls() != 2+i {
			t.Fatalf("Calls = %d, want %d", b.srv.Calls(), 2+i)
		}
	}
	if c := b.srv.CallLog()[1]; !c.Dropped || c.Status != 0 {
		t.Errorf("call log %+v", c)
	}

	b.srv.SetDown(false)
	mustRefresh(t, b.ctx, b.basic(), rt) // a dropped call spends nothing
}

func TestDropAnswers(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken
	b.srv.DropAnswers(1)

	_, err := refresh(b.ctx, b.basic(), rt)
	wantTransportError(t, err)
	if c := b.srv.CallLog()[0]; !c.Dropped || c.Status != 200 {
		t.Errorf("call log %+v", c)
	}
	// The lost answer spent the refresh token: a retry is a reuse.
	_, err = refresh(b.ctx, b.basic(), rt)
	wantAnswer(t, err, 400, "invalid_grant")
	if b.srv.Reuses() != 1 {
		t.Errorf("Reuses = %d, want 1", b.srv.Reuses())
	}
	mustRefresh(t, b.ctx, b.basic(), b.srv.CurrentRefreshToken(rt))
}

func TestLatency(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken

	b.srv.SetLatency(100 * time.Millisecond)
	start := time.Now()
	tok := mustRefresh(t, b.ctx, b.basic(), rt)
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("answered after %v, want at least 100ms", d)
	}

	b.srv.SetLatency(time.Hour)
	ctx, cancel := context.WithTimeout(b.ctx, 50*time.Millisecond)
	defer cancel()
	_, err := refresh(ctx, b.basic(), tok.RefreshToken)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want context.DeadlineExceeded", err)
	}
	// The server stops waiting when the client goes away.
	wait, cancelWait := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancelWait()
	if err := b.srv.WaitCalls(wait, 2); err != nil {
		t.Fatalf("the abandoned call is still waiting: %v", err)
	}
	if c := b.srv.CallLog()[1]; !c.Dropped || c.Status != 0 {
		t.Errorf("call log %+v", c)
	}

	b.srv.SetLatency(0)
	mustRefresh(t, b.ctx, b.basic(), tok.RefreshToken) // the abandoned call spent nothing
	if b.srv.Reuses() != 0 {
		t.Errorf("Reuses = %d, want 0", b.srv.Reuses())
	}
}

func TestOnToken(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken
	entered := make(chan string, 1)
	release := make(chan struct{})
	b.srv.OnToken(func(r *http.Request) {
		entered <- r.PostForm.Get("refresh_token")
		<-release
	})

	done := make(chan error, 1)
	go func() {
		_, err := refresh(b.ctx, b.basic(), rt)
		done <- err
	}()
	if got := <-entered; got != rt {
		t.Errorf("hook saw refresh_token %q, want %q", got, rt)
	}
	if c := b.srv.CallLog(); b.srv.Calls() != 1 || c[0].Status != 0 {
		t.Errorf("mid-call: Calls %d, log %+v", b.srv.Calls(), c)
	}
	b.srv.Revoke(rt) // state changed while the call is in flight
	close(release)
	if re := wantAnswer(t, <-done, 400, "invalid_grant"); re.ErrorDescription != "token revoked" {
		t.Errorf("error_description %q", re.ErrorDescription)
	}

	// The hook does not run for a call that fails authentication, and nil removes it.
	b.srv.OnToken(func(*http.Request) { t.Error("hook ran for an unauthenticated call") })
	_, err := refresh(b.ctx, b.config(confID, "wrong", oauth2.AuthStyleInHeader), rt)
	wantAnswer(t, err, 401, "invalid_client")
	b.srv.OnToken(nil)
	_, err = refresh(b.ctx, b.basic(), rt)
	wantAnswer(t, err, 400, "invalid_grant")
}
