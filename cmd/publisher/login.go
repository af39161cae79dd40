package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"time"

	"golang.org/x/oauth2"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/workers/discovery"
)

func login(ctx context.Context, args []string, s streams) error {
	f := newFlags("login", "login [flags] --issuer URL --client-id ID KEY", `
Log in at an authorization server and register the tokens for the
credential KEY, as "publisher register" would. Registering an existing KEY
replaces its tokens: this is how a person repairs needs_reauth.

By default login uses the authorization code grant with PKCE (RFC 7636): it
listens on 127.0.0.1 on a random port (the loopback redirect of RFC 8252),
prints the authorization URL and opens it in a browser (on Linux only when
DISPLAY or WAYLAND_DISPLAY is set), waits for the redirect, checks its state
and exchanges the code. On a machine without a browser, --device uses the
device authorization grant (RFC 8628): it prints a URL and a code to enter
on any other device, and polls until the login is approved.

The authorization, device and token endpoints come from the issuer's
metadata (RFC 8414 discovery, as for register --issuer); the client must
allow loopback redirect URIs (any port) or the device grant. The tokens go
only to the refreshers, over auth.register: nothing is written to disk and
no token is printed.

Try it against the development server: publisher devserver prints a login
command ready to run.`, s)
	var req events.RegisterRequest
	var scopes cli.StringList
	defineClientFlags(f, &req, &scopes, "authorization server issuer (required); its endpoints are found by RFC 8414 discovery")
	device := f.Bool("device", false, "use the device authorization grant: show a URL and a code to enter on another device")
	f.bind("device", "AUTHBUS_DEVICE")
	noBrowser := f.Bool("no-browser", false, "print the login URL without trying to open a browser")
	f.bind("no-browser", "AUTHBUS_NO_BROWSER")
	wait := f.Duration("login-timeout", 5*time.Minute, "how long to wait for the login to be approved")
	f.bind("login-timeout", "AUTHBUS_LOGIN_TIMEOUT")
	asJSON := registerJSONFlag(f)
	if err := f.parse(args); err != nil {
		return err
	}
	key, err := f.oneKey()
	if err != nil {
		return err
	}
	req.Scopes = scopes
	if req.Issuer == "" {
		return usageErrorf("--issuer is required: login finds the authorization server's endpoints in its metadata; run \"publisher login --help\"")
	}
	if *wait <= 0 {
		return usageErrorf("--login-timeout %v: give a positive duration such as 5m", *wait)
	}
	if *device && f.env.Origin("no-browser") == "--no-browser" {
		return usageErrorf("--no-browser is for the browser login; --device opens no browser anyway: drop one of the two")
	}
	// Everything but the token, checked before anyone logs in for nothing.
	probe := req
	probe.Token.AccessToken = "checked-after-login"
	if err := probe.Validate(); err != nil {
		return usageErrorf("%w; see \"publisher login --help\"", err)
	}
	c, err := f.connect()
	if err != nil {
		return err
	}
	defer c.close()

	hc := &http.Client{Timeout: httpTimeout}
	md, err := discover(ctx, hc, req.Issuer)
	if err != nil {
		return err
	}
	style := req.AuthStyle
	switch {
	case style != "":
	case req.ClientSecret == "":
		// A public client names itself in the form; it has no secret for
		// HTTP Basic (RFC 6749 §2.3.1).
		style = events.AuthStylePost
	default:
		style = md.AuthStyle()
	}
	cfg := &oauth2.Config{
		ClientID:     req.ClientID,
		ClientSecret: req.ClientSecret,
		Scopes:       req.Scopes,
		Endpoint: oauth2.Endpoint{
			AuthURL:       md.AuthorizationEndpoint,
			DeviceAuthURL: md.DeviceAuthorizationEndpoint,
			TokenURL:      md.TokenEndpoint,
			AuthStyle:     map[string]oauth2.AuthStyle{events.AuthStyleBasic: oauth2.AuthStyleInHeader, events.AuthStylePost: oauth2.AuthStyleInParams}[style],
		},
	}
	var extra []oauth2.AuthCodeOption
	if req.Resource != "" {
		extra = append(extra, oauth2.SetAuthURLParam("resource", req.Resource))
	}
	lctx, cancel := context.WithTimeout(context.WithValue(ctx, oauth2.HTTPClient, hc), *wait)
	defer cancel()
	var tok *oauth2.Token
	if *device {
		tok, err = deviceLogin(lctx, cfg, md, extra, s)
	} else {
		tok, err = browserLogin(lctx, cfg, md, extra, !*noBrowser, s)
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil:
		return fmt.Errorf("the login was not approved within %v (--login-timeout); run login again", *wait)
	case err != nil:
		return err
	}

	req.AuthStyle = style
	req.Token = events.RegisterToken{AccessToken: tok.AccessToken, TokenType: tok.TokenType, RefreshToken: tok.RefreshToken, ExpiresAt: tok.Expiry}
	fmt.Fprintf(s.errOut, "logged in at %s; registering %s\n", md.Issuer, key)
	if tok.RefreshToken == "" {
		fmt.Fprintln(s.errOut, "warning: the authorization server issued no refresh token (some issue one only with a scope such as offline_access): authbus cannot refresh this credential, and its first 401 ends in needs_reauth")
	}
	reply, err := c.register(ctx, key, req)
	if err != nil {
		return err
	}
	return printRegistered(s, key, reply, *asJSON)
}

// browserLogin runs the authorization code grant with PKCE and a loopback
// redirect (RFC 8252 §7.3) and returns the exchanged tokens.
func browserLogin(ctx context.Context, cfg *oauth2.Config, md discovery.Metadata, extra []oauth2.AuthCodeOption, open bool, s streams) (*oauth2.Token, error) {
	if md.AuthorizationEndpoint == "" {
		return nil, usageErrorf("the metadata of %s names no authorization_endpoint: it does not offer browser logins; try --device", md.Issuer)
	}
	// 127.0.0.1 rather than localhost: RFC 8252 §8.3, localhost may
	// resolve elsewhere or to another address family.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen for the login's redirect on 127.0.0.1: %w", err)
	}
	cfg.RedirectURL = fmt.Sprintf("http://%s/callback", l.Addr())
	state := rand.Text()
	verifier := oauth2.GenerateVerifier()
	cb := &callback{state: state, issuer: md.Issuer, done: make(chan callbackResult, 1)}
	srv := &http.Server{Handler: cb, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(l)
	}()
	defer func() {
		// Shutdown lets the browser get its page before the listener goes.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if srv.Shutdown(sctx) != nil {
			_ = srv.Close()
		}
		<-served
	}()

	authURL := cfg.AuthCodeURL(state, append([]oauth2.AuthCodeOption{oauth2.S256ChallengeOption(verifier)}, extra...)...)
	fmt.Fprintf(s.errOut, "Open this URL in a browser and approve the login:\n  %s\n", authURL)
	if open {
		if err := openBrowser(ctx, authURL); err != nil {
			fmt.Fprintf(s.errOut, "(no browser opened: %v)\n", err)
		}
	}
	var res callbackResult
	select {
	case res = <-cb.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if res.err != nil {
		return nil, res.err
	}
	tok, err := cfg.Exchange(ctx, res.code, append([]oauth2.AuthCodeOption{oauth2.VerifierOption(verifier)}, extra...)...)
	if err != nil {
		return nil, fmt.Errorf("exchange the authorization code at %s: %w", cfg.Endpoint.TokenURL, err)
	}
	return tok, nil
}

// callback is the loopback redirect's handler. It answers every request,
// and hands the first one with this login's state to the waiting login.
type callback struct {
	state, issuer string
	done          chan callbackResult // buffered: one result
	once          sync.Once
}

type callbackResult struct {
	code string
	err  error
}

func (cb *callback) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if r.URL.Path != "/callback" || q.Get("state") != cb.state {
		// Not this login's redirect (another tab, a forged request): ignore
		// it and keep waiting.
		http.Error(w, "This is not the redirect of the login the publisher is waiting for; it was ignored.", http.StatusBadRequest)
		return
	}
	var res callbackResult
	switch iss := q.Get("iss"); {
	case iss != "" && iss != cb.issuer:
		// RFC 9207: the answer came from another server than the one the
		// login went to (a mix-up attack, or a misconfigured client).
		res.err = fmt.Errorf("the login's redirect names the issuer %q, not %q; log in again", iss, cb.issuer)
	case q.Get("error") != "":
		res.err = fmt.Errorf("the authorization server refused the login: %s (%s)", q.Get("error"), q.Get("error_description"))
	case q.Get("code") == "":
		res.err = errors.New("the login's redirect carried neither a code nor an error; log in again")
	default:
		res.code = q.Get("code")
	}
	cb.once.Do(func() { cb.done <- res })
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if res.err != nil {
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprintf(w, "Login failed: %v\n", res.err)
		return
	}
	fmt.Fprintln(w, "Logged in. The publisher registers the tokens now: close this window and return to the terminal.")
}

// openBrowser opens u in the desktop's browser. On Linux it needs a
// graphical session: without one xdg-open may start a text browser in the
// login's own terminal.
func openBrowser(ctx context.Context, u string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var cmd *exec.Cmd
	switch runtime.GOOS {
	case "darwin":
		cmd = exec.CommandContext(ctx, "open", u)
	case "windows":
		cmd = exec.CommandContext(ctx, "rundll32", "url.dll,FileProtocolHandler", u)
	default:
		if os.Getenv("DISPLAY") == "" && os.Getenv("WAYLAND_DISPLAY") == "" {
			return errors.New("no graphical session (DISPLAY is not set); open the URL on any machine that reaches this one's 127.0.0.1, or use --device")
		}
		cmd = exec.CommandContext(ctx, "xdg-open", u)
	}
	return cmd.Run()
}

// deviceLogin runs the device authorization grant (RFC 8628) and returns
// the tokens once a person approved the code on another device.
func deviceLogin(ctx context.Context, cfg *oauth2.Config, md discovery.Metadata, extra []oauth2.AuthCodeOption, s streams) (*oauth2.Token, error) {
	if md.DeviceAuthorizationEndpoint == "" {
		return nil, usageErrorf("the metadata of %s names no device_authorization_endpoint: it does not offer the device grant; log in without --device", md.Issuer)
	}
	if err := checkEndpoint("device_authorization_endpoint", md.DeviceAuthorizationEndpoint); err != nil {
		return nil, err
	}
	da, err := cfg.DeviceAuth(ctx, extra...)
	if err != nil {
		return nil, fmt.Errorf("start a device login at %s: %w", md.DeviceAuthorizationEndpoint, err)
	}
	fmt.Fprintf(s.errOut, "On any device, open %s and enter the code %s\n", da.VerificationURI, da.UserCode)
	if da.VerificationURIComplete != "" {
		fmt.Fprintf(s.errOut, "(or open %s)\n", da.VerificationURIComplete)
	}
	tok, err := cfg.DeviceAccessToken(ctx, da, extra...)
	var re *oauth2.RetrieveError
	switch {
	case errors.As(err, &re) && re.ErrorCode == "access_denied":
		return nil, errors.New("the login was denied on the verification page")
	case errors.As(err, &re) && re.ErrorCode == "expired_token":
		return nil, errors.New("the code expired before it was approved; run login again")
	case err != nil:
		return nil, fmt.Errorf("device login at %s: %w", cfg.Endpoint.TokenURL, err)
	}
	return tok, nil
}
