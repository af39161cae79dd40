package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authserver"
)

// devKey is the credential key the printed login command registers.
const devKey = "acme.alice.demo"

func devserver(ctx context.Context, args []string, s streams) error {
	f := newFlags("devserver", "devserver [flags]", `
Run a development OAuth authorization server on this machine, for trying
authbus without an identity provider: log in against it with "publisher
login", and watch the refresher rotate the short-lived tokens it issues.
It prints its issuer URL and a login command ready to run, then one line per
token-endpoint call (never a token), until Ctrl-C. Everything it issued is
forgotten when it stops.

It is a real authorization server over plain HTTP: authorization code grant
with PKCE (S256) behind a consent page, device authorization grant (RFC
8628) with a verification page, refresh-token rotation with reuse
detection, revocation (RFC 7009) and RFC 8414 metadata at
<issuer>/.well-known/oauth-authorization-server. It has no user accounts:
whoever approves on its consent page is the user, so it listens on a
loopback address only (127.0.0.1, ::1 or localhost) and refuses others.

The refresher accepts its loopback token endpoint in the embedded default
(go run ./cmd/refresher); a refresher that joins a deployment with
--nats-url refuses it. The connection flags only go into the printed login
command: devserver itself does not connect to NATS.`, s)
	listen := f.String("listen", "127.0.0.1:9096", "loopback `address` to serve on (host:port)")
	f.bind("listen", "AUTHBUS_DEVSERVER_LISTEN")
	clientID := f.String("client-id", "authbus-dev", "the OAuth client the server knows")
	f.bind("client-id", "AUTHBUS_CLIENT_ID")
	clientSecret := f.String("client-secret", "", "the client's secret, which makes it confidential (default: a public client, PKCE only)")
	f.bind("client-secret", "AUTHBUS_CLIENT_SECRET")
	lifetime := f.Duration("token-lifetime", time.Minute, "how long access tokens live; the refresher renews a token when about half of a 1m lifetime is left, so a rotation shows within a minute")
	f.bind("token-lifetime", "AUTHBUS_DEVSERVER_TOKEN_LIFETIME")
	reuse := f.String("reuse", "invalid_grant", "the answer to a spent refresh token presented again: "+authserver.ReuseModeNames)
	f.bind("reuse", "AUTHBUS_DEVSERVER_REUSE")
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() != 0 {
		return usageErrorf("devserver takes no arguments, got %q; run \"publisher devserver --help\"", f.Args())
	}
	if *lifetime < time.Second {
		return usageErrorf("--token-lifetime %v: give at least 1s, such as 1m", *lifetime)
	}
	mode, err := authserver.ParseReuseMode(*reuse)
	if err != nil {
		return usageErrorf("--reuse: %w", err)
	}
	if *clientID == "" {
		return usageErrorf("--client-id is empty: name the client, such as authbus-dev")
	}

	as, err := authserver.Start(*listen)
	if errors.Is(err, authserver.ErrNotLoopback) {
		return usageErrorf("--listen: %w", err)
	}
	if err != nil {
		return fmt.Errorf("%w; is another devserver running there? pick another --listen port", err)
	}
	defer as.Close()
	as.AddClient(*clientID, *clientSecret)
	as.SetExpiresIn(int64(lifetime.Round(time.Second) / time.Second))
	as.SetReuse(mode)
	// A person types the user code and comes back: short polls make the
	// device flow answer as soon as they approve.
	as.SetDeviceInterval(time.Second)

	kind := "public: PKCE, no secret"
	if *clientSecret != "" {
		kind = "confidential: give login the same secret in AUTHBUS_CLIENT_SECRET"
	}
	fmt.Fprintf(s.out, "development authorization server, issuer %s (loopback only)\n", as.BaseURL())
	fmt.Fprintf(s.out, "client %s (%s); access tokens live %v, refresh tokens rotate, reuse → %s\n", *clientID, kind, lifetime.Round(time.Second), mode)
	fmt.Fprintf(s.out, "log in and register a credential, in another shell (add --device on a headless machine):\n  %s\n", loginCommand(f.g, as.BaseURL(), *clientID))

	var mu sync.Mutex // calls are logged from the server's goroutines
	as.OnCall(func(c authserver.Call) {
		line := fmt.Sprintf("%s token call: %s for client %s → %d", time.Now().Format(time.TimeOnly), c.GrantType, c.ClientID, c.Status)
		if c.Error != "" {
			line += " " + c.Error
		}
		if c.Reuse {
			line += " (a spent refresh token was presented again)"
		}
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintln(s.out, line)
	})
	<-ctx.Done()
	fmt.Fprintln(s.out, "devserver stopped; the tokens it issued are void")
	return nil
}

// loginCommand is a login command line for the development server, with
// the connection flags that differ from their defaults.
func loginCommand(g globals, issuer, clientID string) string {
	words := []string{publisherCommand(), "login"}
	if g.conn.URL != nats.DefaultURL {
		words = append(words, "--nats-url", g.conn.URL)
	}
	if g.conn.Creds != "" {
		words = append(words, "--nats-creds", g.conn.Creds)
	}
	if g.prefix != events.DefaultPrefix {
		words = append(words, "--prefix", g.prefix)
	}
	words = append(words, "--issuer", issuer, "--client-id", clientID, devKey)
	return strings.Join(words, " ")
}

// publisherCommand is how the person runs this program: "go run
// ./cmd/publisher" when go run built it, else "publisher".
func publisherCommand() string {
	if exe, err := os.Executable(); err == nil && strings.Contains(exe, "go-build") {
		return "go run ./cmd/publisher"
	}
	return "publisher"
}
