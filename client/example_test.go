package client_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/client"
	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/examplebus"
)

// A runtime gets an HTTP client whose bearer token authbus keeps fresh.
func Example() {
	nc, api, stop := startAuthbus("rt-example") // NATS, a refresher, a registered credential, an API
	defer stop()

	src, err := client.New(nc, "acme.alice.api", client.WithRuntime("example-host"))
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()
	resp, err := src.Client().Get(api.URL)
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.Status, string(body))
	// Output: 200 OK hello, alice
}

// Source is an oauth2.TokenSource: Token answers from the local copy that
// auth.rotated events keep current, and asks auth.token only on first use.
func ExampleSource_Token() {
	nc, _, stop := startAuthbus("rt-example")
	defer stop()

	src, err := client.New(nc, "acme.alice.api")
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()
	tok, err := src.Token()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(tok.Type(), events.Fingerprint(tok.AccessToken) == events.Fingerprint(exampleAccessToken))
	// Output: Bearer true
}

// When only a person can repair a credential, a request fails with a
// *NeedsReauthError instead of retrying. Here the credential was registered
// without a refresh token, and the API refuses its access token.
func ExampleNeedsReauthError() {
	nc, api, stop := startAuthbus("") // no refresh token
	defer stop()
	src, err := client.New(nc, "acme.alice.api")
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()

	_, err = src.Client().Get(api.URL + "/revoked")
	var reauth *client.NeedsReauthError
	if errors.As(err, &reauth) {
		fmt.Println("log in again:", reauth.Reason)
	}
	// Output: log in again: no_refresh_token
}

// A runtime that holds the HTTP exchange itself (a gRPC stream, a
// WebSocket, another SDK's transport) runs the recipe for a 401 with Renew:
// report the refused token, ask auth.token at once, and wait for the
// rotation only if that does not already answer. Here the refused token was
// replaced long ago, so the answer comes at once.
func ExampleSource_Renew() {
	nc, _, stop := startAuthbus("rt-example")
	defer stop()
	src, err := client.New(nc, "acme.alice.api", client.WithWaitTimeout(10*time.Second))
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()

	refused := events.Fingerprint("at-from-last-week")
	tok, err := src.Renew(context.Background(), client.Refusal{Fingerprint: refused, URL: "https://api.example/v1/items"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("version", tok.Version, "replaces the refused token:", tok.Fingerprint != refused)
	// Output: version 1 replaces the refused token: true
}

// A tool reads the current token once, without subscribing to anything.
func ExampleFetchToken() {
	nc, _, stop := startAuthbus("rt-example")
	defer stop()
	tok, err := client.FetchToken(context.Background(), nc, "acme.alice.api")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(tok.TokenType, "version", tok.Version)
	// Output: Bearer version 1
}

// Watch follows the events of many keys: here every auth.rotated of tenant
// acme. A report of a token that was already replaced makes the refreshers
// announce the current one again.
func ExampleWatch() {
	nc, _, stop := startAuthbus("rt-example")
	defer stop()
	w, err := client.Watch(nc, []string{"acme.>"}, []events.Type{events.TypeRotated})
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close()

	src, err := client.New(nc, "acme.alice.api")
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()
	if _, err := src.Report401(context.Background(), client.Refusal{Fingerprint: events.Fingerprint("at-from-last-week")}); err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ev, err := w.Next(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ev.Type, ev.Subject, "version", ev.Rotated.Version)
	// Output: auth.rotated acme.alice.api version 1
}

const exampleAccessToken = "at-example-alice"

// startAuthbus runs what a deployment runs, for the examples: an embedded
// NATS server with JetStream, one refresher, the credential acme.alice.api
// registered with exampleAccessToken (and refreshToken, if not ""), and an
// API that accepts that token except on /revoked.
func startAuthbus(refreshToken string) (*nats.Conn, *httptest.Server, func()) {
	bus := examplebus.Start()
	bus.Register("acme.alice.api", exampleAccessToken, refreshToken)
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+exampleAccessToken || r.URL.Path == "/revoked" {
			http.Error(w, "invalid token", http.StatusUnauthorized)
			return
		}
		fmt.Fprint(w, "hello, alice")
	}))
	return bus.NC, api, func() {
		api.Close()
		bus.Stop()
	}
}
