package events_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
)

const (
	secretAccess  = "AT-SECRET-access-5d1c"
	secretRefresh = "RT-SECRET-refresh-9e2b"
	secretClient  = "CS-SECRET-client-7a4f"
)

// registerBody returns a valid register request as a generic JSON object, to
// be changed by a test case.
func registerBody() map[string]any {
	return map[string]any{
		"token": map[string]any{
			"access_token":  secretAccess,
			"token_type":    "Bearer",
			"refresh_token": secretRefresh,
			"expires_in":    3600,
		},
		"token_endpoint": "https://auth.example.com/oauth/token",
		"client_id":      "authbus",
		"client_secret":  secretClient,
		"auth_style":     "basic",
		"grant":          "refresh_token",
		"scopes":         []any{"openid", "offline_access", "mcp:tools"},
		"resource":       "https://mcp.example.com/mcp",
	}
}

func encodeBody(t *testing.T, m map[string]any) []byte {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecodeRegisterRequest(t *testing.T) {
	t.Parallel()
	r, err := events.DecodeRegisterRequest(encodeBody(t, registerBody()))
	if err != nil {
		t.Fatal(err)
	}
	want := events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: secretAccess, TokenType: "Bearer", RefreshToken: secretRefresh, ExpiresIn: 3600},
		TokenEndpoint: "https://auth.example.com/oauth/token",
		ClientID:      "authbus",
		ClientSecret:  secretClient,
		AuthStyle:     events.AuthStyleBasic,
		Grant:         events.GrantRefreshToken,
		Scopes:        []string{"openid", "offline_access", "mcp:tools"},
		Resource:      "https://mcp.example.com/mcp",
	}
	if !reflect.DeepEqual(r, want) {
		t.Fatalf("got  %#v\nwant %#v", r, want)
	}
	// Re-encoding gives the same request back.
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	again, err := events.DecodeRegisterRequest(b)
	if err != nil || !reflect.DeepEqual(again, r) {
		t.Fatalf("round trip = %#v, %v", again, err)
	}
}

func TestDecodeRegisterRequestAccepts(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		mutate func(m, tok map[string]any)
		check  func(*testing.T, events.RegisterRequest)
	}{
		{name: "minimal", mutate: func(m, tok map[string]any) {
			for _, f := range []string{"client_secret", "auth_style", "grant", "scopes", "resource"} {
				delete(m, f)
			}
			for _, f := range []string{"token_type", "refresh_token", "expires_in"} {
				delete(tok, f)
			}
		}, check: func(t *testing.T, r events.RegisterRequest) {
			if r.Token.TokenType != "Bearer" {
				t.Fatalf("token_type = %q, want the default Bearer", r.Token.TokenType)
			}
		}},
		{name: "issuer instead of token_endpoint", mutate: func(m, _ map[string]any) {
			delete(m, "token_endpoint")
			m["issuer"] = "https://auth.example.com/tenant/1"
		}},
		{name: "http on localhost", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "http://localhost:8080/token" }},
		{name: "http on 127.0.0.0/8", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "http://127.0.0.2:8080/token" }},
		{name: "http on ::1", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "http://[::1]:8080/token" }},
		{name: "token endpoint with a query", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "https://auth.example.com/token?tenant=1" }},
		{name: "refresh grant without refresh token", mutate: func(_, tok map[string]any) { delete(tok, "refresh_token") }},
		{name: "client_credentials with secret", mutate: func(m, _ map[string]any) { m["grant"] = "client_credentials" }},
		{name: "post auth style", mutate: func(m, _ map[string]any) { m["auth_style"] = "post" }},
		{name: "URN resource", mutate: func(m, _ map[string]any) { m["resource"] = "urn:example:api" }},
		{name: "empty scopes array", mutate: func(m, _ map[string]any) { m["scopes"] = []any{} }, check: func(t *testing.T, r events.RegisterRequest) {
			if r.Scopes != nil {
				t.Fatalf("scopes = %#v, want nil", r.Scopes)
			}
		}},
		{name: "expires_at with an offset comes back in UTC", mutate: func(_, tok map[string]any) {
			delete(tok, "expires_in")
			tok["expires_at"] = "2030-01-02T04:04:05+01:00"
		}, check: func(t *testing.T, r events.RegisterRequest) {
			if want := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC); r.Token.ExpiresAt != want {
				t.Fatalf("expires_at = %v, want %v", r.Token.ExpiresAt, want)
			}
		}},
		{name: "null optional fields", mutate: func(m, _ map[string]any) { m["scopes"] = nil; m["resource"] = nil }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m := registerBody()
			tt.mutate(m, m["token"].(map[string]any))
			r, err := events.DecodeRegisterRequest(encodeBody(t, m))
			if err != nil {
				t.Fatalf("DecodeRegisterRequest: %v", err)
			}
			if err := r.Validate(); err != nil {
				t.Fatalf("Validate after decode: %v", err)
			}
			if tt.check != nil {
				tt.check(t, r)
			}
		})
	}
}

func TestDecodeRegisterRequestRefuses(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		mutate func(m, tok map[string]any) // applied to a valid request
		raw    string                      // used instead when set
		want   []string                    // substrings of the message, the field path first
	}{
		// Size and syntax.
		{name: "too large", mutate: func(m, _ map[string]any) { m["client_id"] = strings.Repeat("c", events.MaxRegisterSize) }, want: []string{"size is"}},
		{name: "empty body", raw: " ", want: []string{"body is not valid JSON"}},
		{name: "not an object", raw: `"token"`, want: []string{"body is not a JSON object"}},
		{name: "invalid UTF-8", raw: "{\"client_id\":\"\xff\"}", want: []string{"body is not valid UTF-8"}},
		{name: "unknown field", mutate: func(m, _ map[string]any) { m["refresh_token"] = "x" }, want: []string{`"refresh_token" is not a known field; remove it`}},
		{name: "unknown token field", mutate: func(_, tok map[string]any) { tok["id_token"] = "x" }, want: []string{`"token.id_token" is not a known field`}},
		{name: "field in other case", mutate: func(m, _ map[string]any) { m["Client_ID"] = m["client_id"] }, want: []string{`"Client_ID" is not a field (names are case-sensitive); use "client_id"`}},
		{name: "field twice", raw: `{"client_id":"a","client_id":"b"}`, want: []string{`the field "client_id" twice`}},
		{name: "token not an object", mutate: func(m, _ map[string]any) { m["token"] = secretAccess }, want: []string{"token is not a JSON object"}},

		// token.
		{name: "token missing", mutate: func(m, _ map[string]any) { delete(m, "token") }, want: []string{"token.access_token is missing"}},
		{name: "access_token missing", mutate: func(_, tok map[string]any) { delete(tok, "access_token") }, want: []string{"token.access_token is missing"}},
		{name: "access_token too large", mutate: func(_, tok map[string]any) { tok["access_token"] = strings.Repeat("a", events.MaxAccessTokenSize+1) }, want: []string{"token.access_token is 12289 bytes"}},
		{name: "access_token with a line break", mutate: func(_, tok map[string]any) { tok["access_token"] = "a\nb" }, want: []string{"token.access_token has characters outside printable ASCII"}},
		{name: "refresh_token with a line break", mutate: func(_, tok map[string]any) { tok["refresh_token"] = "a\nb" }, want: []string{"token.refresh_token has characters outside printable ASCII"}},
		{name: "token_type two words", mutate: func(_, tok map[string]any) { tok["token_type"] = "Bearer Bearer" }, want: []string{`token.token_type is "Bearer Bearer"`}},
		{name: "expires_in negative", mutate: func(_, tok map[string]any) { tok["expires_in"] = -1 }, want: []string{"token.expires_in is -1"}},
		{name: "expires_in a string", mutate: func(_, tok map[string]any) { tok["expires_in"] = "3600" }, want: []string{"token.expires_in is a string; want an integer"}},
		{name: "expires_in over 100 years", mutate: func(_, tok map[string]any) { tok["expires_in"] = int64(1) << 40 }, want: []string{"token.expires_in is 1099511627776 seconds, over 100 years"}},
		{name: "expires_at not a time", mutate: func(_, tok map[string]any) { delete(tok, "expires_in"); tok["expires_at"] = "tomorrow" }, want: []string{"token.expires_at is not an RFC 3339 time"}},
		{name: "expires_in and expires_at", mutate: func(_, tok map[string]any) { tok["expires_at"] = "2030-01-02T03:04:05Z" }, want: []string{"token.expires_in and token.expires_at are both set, which is ambiguous"}},

		// Where to refresh.
		{name: "token_endpoint and issuer", mutate: func(m, _ map[string]any) { m["issuer"] = "https://auth.example.com" }, want: []string{"token_endpoint and issuer are both set"}},
		{name: "neither token_endpoint nor issuer", mutate: func(m, _ map[string]any) { delete(m, "token_endpoint") }, want: []string{"token_endpoint or issuer is required"}},
		{name: "token_endpoint relative", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "/oauth/token" }, want: []string{"token_endpoint is not an absolute URL"}},
		{name: "token_endpoint without host", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "https:///token" }, want: []string{"token_endpoint is not an absolute URL"}},
		{name: "token_endpoint with a port but no host", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "https://:443/token" }, want: []string{"token_endpoint is not an absolute URL"}},
		{name: "token_endpoint http", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "http://auth.example.com/token" }, want: []string{"token_endpoint uses http; use https"}},
		{name: "token_endpoint http on a look-alike host", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "http://localhost.example.com/token" }, want: []string{"token_endpoint uses http; use https"}},
		{name: "token_endpoint other scheme", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "ftp://auth.example.com/token" }, want: []string{`token_endpoint has the scheme "ftp"; use https`}},
		{name: "token_endpoint with userinfo", mutate: func(m, _ map[string]any) {
			m["token_endpoint"] = "https://id:" + secretClient + "@auth.example.com/token"
		}, want: []string{"token_endpoint contains a user name or password"}},
		{name: "token_endpoint with fragment", mutate: func(m, _ map[string]any) { m["token_endpoint"] = "https://auth.example.com/token#x" }, want: []string{"token_endpoint has a fragment"}},
		{name: "issuer http", mutate: func(m, _ map[string]any) { delete(m, "token_endpoint"); m["issuer"] = "http://auth.example.com" }, want: []string{"issuer uses http; use https"}},
		{name: "issuer with query", mutate: func(m, _ map[string]any) { delete(m, "token_endpoint"); m["issuer"] = "https://auth.example.com?x=1" }, want: []string{"issuer has a query"}},

		// Client.
		{name: "client_id missing", mutate: func(m, _ map[string]any) { delete(m, "client_id") }, want: []string{"client_id is missing"}},
		{name: "auth_style unknown", mutate: func(m, _ map[string]any) { m["auth_style"] = "client_secret_basic" }, want: []string{`auth_style is "client_secret_basic"; send "basic", "post"`}},
		{name: "grant unknown", mutate: func(m, _ map[string]any) { m["grant"] = "password" }, want: []string{`grant is "password"; send "refresh_token", "client_credentials"`}},
		{name: "client_credentials without secret", mutate: func(m, _ map[string]any) { m["grant"] = "client_credentials"; delete(m, "client_secret") }, want: []string{"client_secret is missing; the client_credentials grant needs it"}},

		// Scopes and resource.
		{name: "scope empty", mutate: func(m, _ map[string]any) { m["scopes"] = []any{"openid", ""} }, want: []string{"scopes[1] is empty"}},
		{name: "scope with a space", mutate: func(m, _ map[string]any) { m["scopes"] = []any{"openid offline_access"} }, want: []string{"scopes[0] is \"openid offline_access\", which contains a space"}},
		{name: "scope with a quote", mutate: func(m, _ map[string]any) { m["scopes"] = []any{`a"b`} }, want: []string{"scopes[0] is", "RFC 6749 §3.3"}},
		{name: "scopes a string", mutate: func(m, _ map[string]any) { m["scopes"] = "openid" }, want: []string{"scopes is a string; want an array of strings"}},
		{name: "scopes with a number", mutate: func(m, _ map[string]any) { m["scopes"] = []any{"openid", 7} }, want: []string{"scopes has an element that is a number; want an array of strings"}},
		{name: "resource relative", mutate: func(m, _ map[string]any) { m["resource"] = "mcp.example.com" }, want: []string{"resource is not an absolute URI"}},
		{name: "resource with fragment", mutate: func(m, _ map[string]any) { m["resource"] = "https://mcp.example.com/mcp#tools" }, want: []string{"resource has a fragment"}},

		// Everything at once.
		{name: "several problems", mutate: func(m, tok map[string]any) {
			delete(m, "client_id")
			tok["expires_in"] = -5
			m["grant"] = "implicit"
		}, want: []string{"token.expires_in is -5", "client_id is missing", `grant is "implicit"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := []byte(tt.raw)
			if tt.raw == "" {
				m := registerBody()
				tt.mutate(m, m["token"].(map[string]any))
				b = encodeBody(t, m)
			}
			r, err := events.DecodeRegisterRequest(b)
			if err == nil {
				t.Fatalf("accepted %s as %v", b, r)
			}
			if !errors.Is(err, events.ErrInvalidRequest) {
				t.Fatalf("error %v does not wrap ErrInvalidRequest", err)
			}
			for _, want := range tt.want {
				if !strings.Contains(err.Error(), want) {
					t.Fatalf("error = %q\nwant it to contain %q", err, want)
				}
			}
			for _, secret := range []string{secretAccess, secretRefresh, secretClient} {
				if strings.Contains(err.Error(), secret) {
					t.Fatalf("error repeats a secret: %q", err)
				}
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error has a line break, which a Nats-Service-Error header cannot carry: %q", err)
			}
		})
	}
}

func TestRegisterRequestValidate(t *testing.T) {
	t.Parallel()
	r := events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: "at"},
		TokenEndpoint: "https://auth.example.com/token",
		ClientID:      "c",
	}
	if err := r.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	r.Token.ExpiresAt = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)
	if err := r.Validate(); !errors.Is(err, events.ErrInvalidRequest) || !strings.Contains(err.Error(), "token.expires_at is in the year 10000") {
		t.Fatalf("Validate with year 10000: %v", err)
	}
}

func TestRegisterTokenExpiry(t *testing.T) {
	t.Parallel()
	received := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	at := time.Date(2030, 1, 1, 2, 0, 0, 0, time.FixedZone("CET", 3600))
	if got := (events.RegisterToken{ExpiresIn: 3600}).Expiry(received); !got.Equal(received.Add(time.Hour)) {
		t.Errorf("expires_in: %v", got)
	}
	if got := (events.RegisterToken{ExpiresAt: at}).Expiry(received); got != at.UTC() {
		t.Errorf("expires_at: %v", got)
	}
	if got := (events.RegisterToken{}).Expiry(received); !got.IsZero() {
		t.Errorf("no expiry: %v", got)
	}
}

// TestRedaction formats and logs every value that holds a secret in every
// way a developer might, and checks no secret comes out.
func TestRedaction(t *testing.T) {
	t.Parallel()
	req := events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: secretAccess, TokenType: "Bearer", RefreshToken: secretRefresh, ExpiresIn: 60},
		TokenEndpoint: "https://id:" + secretClient + "@auth.example.com/token", // invalid, but may be logged while refusing it
		ClientID:      "authbus",
		ClientSecret:  secretClient,
		Scopes:        []string{"openid"},
	}
	rot := events.Rotated{AccessToken: secretAccess, TokenType: "Bearer", Fingerprint: events.Fingerprint(secretAccess), Version: 4,
		ExpiresAt: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	b, err := events.Encode(testKey, testSource, rot)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := events.Decode(events.TypeRotated, testKey, b)
	if err != nil {
		t.Fatal(err)
	}
	values := map[string]any{
		"RegisterRequest":  req,
		"*RegisterRequest": &req,
		"RegisterToken":    req.Token,
		"Rotated":          rot,
		"*Rotated":         &rot,
		"Event":            *ev,
		"*Event":           ev,
		"Envelope":         ev.Envelope,
		"in a struct":      struct{ R events.Rotated }{rot},
		"in a slice":       []events.RegisterRequest{req},
	}
	for name, v := range values {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			var out strings.Builder
			for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d"} {
				fmt.Fprintf(&out, verb+"\n", v)
			}
			fmt.Fprintln(&out, v)
			var logs bytes.Buffer
			slog.New(slog.NewTextHandler(&logs, nil)).Info("text", "v", v)
			// slog's JSON handler resolves LogValuer only at the top level and
			// marshals what is nested with encoding/json, which writes the wire
			// form, token included; the doc comments say to log values directly.
			if !strings.HasPrefix(name, "in a ") {
				slog.New(slog.NewJSONHandler(&logs, nil)).Info("json", "v", v)
			}
			out.Write(logs.Bytes())
			for _, secret := range []string{secretAccess, secretRefresh, secretClient} {
				for _, form := range []string{secret, fmt.Sprintf("%x", secret), fmt.Sprintf("%X", secret)} {
					if strings.Contains(out.String(), form) {
						t.Fatalf("output contains %q:\n%s", secret, out.String())
					}
				}
			}
			// What is printed is still useful: the access token by fingerprint.
			if !strings.Contains(out.String(), events.Fingerprint(secretAccess)) && name != "Envelope" {
				t.Fatalf("output lacks the fingerprint:\n%s", out.String())
			}
		})
	}
}
