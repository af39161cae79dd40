package events

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"net/url"
	"strings"
	"time"
)

// ErrInvalidRequest is wrapped by every error about an auth.register request
// that breaks the protocol; the token service answers it with
// CodeInvalidRequest.
var ErrInvalidRequest = errors.New("invalid register request")

// Values of RegisterRequest.AuthStyle: how the client authenticates at the
// token endpoint (RFC 6749 §2.3.1). Empty means authbus decides from the
// discovery metadata, else basic.
const (
	AuthStyleBasic = "basic" // HTTP Basic (client_secret_basic)
	AuthStylePost  = "post"  // form parameters (client_secret_post)
)

// Values of RegisterRequest.Grant: how authbus gets the next access token.
// Empty means refresh_token.
const (
	GrantRefreshToken      = "refresh_token"
	GrantClientCredentials = "client_credentials"
)

// DefaultTokenType is the token type DecodeRegisterRequest fills in when the
// request leaves token.token_type out.
const DefaultTokenType = "Bearer"

// maxExpiresIn bounds token.expires_in (100 years) so that the absolute
// expiry computed from it cannot overflow.
const maxExpiresIn = 100 * 365 * 24 * 60 * 60

// RegisterToken is the token set of a register request, as the token endpoint
// returned it.
//
// It holds an access token and a refresh token: fmt and log/slog print
// neither.
type RegisterToken struct {
	// AccessToken is required (printable ASCII, at most MaxAccessTokenSize).
	AccessToken string `json:"access_token"`
	// TokenType defaults to DefaultTokenType.
	TokenType string `json:"token_type,omitempty"`
	// RefreshToken may be empty: a refresh_token grant without one is
	// accepted, and its first refresh ends in needs_reauth.
	RefreshToken string `json:"refresh_token,omitempty"`
	// ExpiresIn is the lifetime in seconds from registration (≥ 0); at most
	// one of ExpiresIn and ExpiresAt is set.
	ExpiresIn int64 `json:"expires_in,omitempty"`
	// ExpiresAt is the absolute expiry.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
}

// Expiry returns when t expires if it was received at receivedAt: ExpiresAt
// when set, else receivedAt + ExpiresIn, else the zero time (no expiry
// known). Expiry is stored absolute because a relative expires_in means
// nothing after a restart.
func (t RegisterToken) Expiry(receivedAt time.Time) time.Time {
	switch {
	case !t.ExpiresAt.IsZero():
		return t.ExpiresAt.UTC()
	case t.ExpiresIn > 0:
		return receivedAt.Add(time.Duration(t.ExpiresIn) * time.Second).UTC()
	}
	return time.Time{}
}

// RegisterRequest is the body of an auth.register request: fresh tokens for
// the key of the subject and how to refresh them. Registering an existing
// key replaces its tokens and settings (it is how a person repairs
// needs_reauth).
//
// It holds tokens and the client secret: fmt and log/slog print none of
// them (log it directly, not inside another struct; see the package doc).
type RegisterRequest struct {
	// Token is the token set to keep fresh.
	Token RegisterToken `json:"token"`
	// TokenEndpoint is the token endpoint URL; exactly one of TokenEndpoint
	// and Issuer is set.
	TokenEndpoint string `json:"token_endpoint,omitempty"`
	// Issuer is the authorization server's issuer; its token endpoint is
	// found by RFC 8414 discovery.
	Issuer string `json:"issuer,omitempty"`
	// ClientID is the OAuth client the tokens were issued to (required).
	ClientID string `json:"client_id"`
	// ClientSecret is required for GrantClientCredentials; empty for public
	// clients.
	ClientSecret string `json:"client_secret,omitempty"`
	// AuthStyle is "", AuthStyleBasic or AuthStylePost.
	AuthStyle string `json:"auth_style,omitempty"`
	// Grant is "", GrantRefreshToken or GrantClientCredentials.
	Grant string `json:"grant,omitempty"`
	// Scopes to ask for on refresh; each an RFC 6749 scope token.
	Scopes []string `json:"scopes,omitempty"`
	// Resource is the RFC 8707 resource indicator (MCP servers require it).
	Resource string `json:"resource,omitempty"`
}

// RegisterReply is the body of a successful auth.register reply.
type RegisterReply struct {
	// Version of the credential now in force.
	Version int64 `json:"version"`
	// Fingerprint of the registered access token.
	Fingerprint string `json:"fingerprint"`
	// ExpiresAt is the absolute expiry; zero means none is known.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
}

// DecodeRegisterRequest decodes and validates the body of an auth.register
// request: at most MaxRegisterSize bytes, one JSON object whose field names
// are all known (matched exactly, each at most once), and Validate. It fills
// in token.token_type (DefaultTokenType) when left out, and returns times in
// UTC.
//
// The error wraps ErrInvalidRequest and names every bad field by its JSON
// path ("token.expires_in"), on one line, ready for Nats-Service-Error.
func DecodeRegisterRequest(b []byte) (RegisterRequest, error) {
	if len(b) > MaxRegisterSize {
		return RegisterRequest{}, requestErr([]problem{{"size", fmt.Sprintf("is %d bytes; register requests are at most %d bytes (MaxRegisterSize)", len(b), MaxRegisterSize)}})
	}
	var r RegisterRequest
	if ps := decodeObject("", b, &r, false); len(ps) > 0 {
		return RegisterRequest{}, requestErr(ps)
	}
	// Canonical form, so that a decoded request equals itself re-encoded
	// and decoded again.
	r.Token.ExpiresAt = r.Token.ExpiresAt.UTC()
	if len(r.Scopes) == 0 {
		r.Scopes = nil
	}
	if ps := r.problems(); len(ps) > 0 {
		return RegisterRequest{}, requestErr(ps)
	}
	if r.Token.TokenType == "" {
		r.Token.TokenType = DefaultTokenType
	}
	return r, nil
}

// Validate reports every field of r that breaks the protocol, in one error
// wrapping ErrInvalidRequest, or nil.
func (r RegisterRequest) Validate() error {
	if ps := r.problems(); len(ps) > 0 {
		return requestErr(ps)
	}
	return nil
}

func requestErr(ps []problem) error {
	return fmt.Errorf("register request: %s: %w", joinProblems(ps), ErrInvalidRequest)
}

func (r RegisterRequest) problems() []problem {
	var ps []problem
	t := r.Token
	ps = checkAccessToken(ps, "token.access_token", t.AccessToken)
	ps = checkTokenType(ps, "token.token_type", t.TokenType, false)
	if !printableASCII(t.RefreshToken) {
		ps = append(ps, problem{"token.refresh_token", "has characters outside printable ASCII (RFC 6749 VSCHAR)"})
	}
	switch {
	case t.ExpiresIn < 0:
		ps = append(ps, problem{"token.expires_in", fmt.Sprintf("is %d; send the token's lifetime in seconds (≥ 0), or leave it out", t.ExpiresIn)})
	case t.ExpiresIn > maxExpiresIn:
		ps = append(ps, problem{"token.expires_in", fmt.Sprintf("is %d seconds, over 100 years; leave it out for a token without expiry", t.ExpiresIn)})
	}
	ps = checkTime(ps, "token.expires_at", t.ExpiresAt, false)
	if t.ExpiresIn != 0 && !t.ExpiresAt.IsZero() {
		ps = append(ps, problem{"token.expires_in", "and token.expires_at are both set, which is ambiguous; send only one"})
	}

	switch {
	case r.TokenEndpoint == "" && r.Issuer == "":
		ps = append(ps, problem{"token_endpoint", "or issuer is required; send the token endpoint URL, or the issuer to discover it (RFC 8414)"})
	case r.TokenEndpoint != "" && r.Issuer != "":
		ps = append(ps, problem{"token_endpoint", "and issuer are both set; send exactly one (issuer makes authbus discover the token endpoint)"})
	case r.TokenEndpoint != "":
		ps = checkServerURL(ps, "token_endpoint", r.TokenEndpoint, false)
	default:
		ps = checkServerURL(ps, "issuer", r.Issuer, true)
	}

	if r.ClientID == "" {
		ps = append(ps, problem{"client_id", "is missing; send the OAuth client id the tokens were issued to"})
	}
	switch r.AuthStyle {
	case "", AuthStyleBasic, AuthStylePost:
	default:
		ps = append(ps, problem{"auth_style", fmt.Sprintf(`is %s; send "basic", "post", or leave it out`, quote(r.AuthStyle))})
	}
	switch r.Grant {
	case "", GrantRefreshToken:
	case GrantClientCredentials:
		if r.ClientSecret == "" {
			ps = append(ps, problem{"client_secret", "is missing; the client_credentials grant needs it"})
		}
	default:
		ps = append(ps, problem{"grant", fmt.Sprintf(`is %s; send "refresh_token", "client_credentials", or leave it out`, quote(r.Grant))})
	}
	for i, sc := range r.Scopes {
		if len(ps) > maxProblems {
			break // joinProblems shows no more; a hostile list may hold thousands
		}
		field := fmt.Sprintf("scopes[%d]", i)
		switch {
		case sc == "":
			ps = append(ps, problem{field, "is empty; remove it"})
		case strings.Contains(sc, " "):
			ps = append(ps, problem{field, fmt.Sprintf("is %s, which contains a space; send each scope as its own element", quote(sc))})
		case !validScope(sc):
			ps = append(ps, problem{field, fmt.Sprintf(`is %s; a scope is printable ASCII without space, '"' or '\' (RFC 6749 §3.3)`, quote(sc))})
		}
	}
	if r.Resource != "" {
		u, err := url.Parse(r.Resource)
		switch {
		case err != nil || u.Scheme == "":
			ps = append(ps, problem{"resource", "is not an absolute URI; send the resource server's URI, such as https://mcp.example.com/mcp (RFC 8707)"})
		case strings.Contains(r.Resource, "#"):
			ps = append(ps, problem{"resource", "has a fragment; remove the #… part (RFC 8707)"})
		}
	}
	return ps
}

// checkServerURL checks the URL of an authorization server. https is
// required so that tokens and secrets never cross a network in clear; plain
// http is allowed on loopback only, for local test servers.
func checkServerURL(ps []problem, field, s string, issuer bool) []problem {
	u, err := url.Parse(s)
	switch {
	case err != nil || u.Scheme == "" || u.Hostname() == "":
		return append(ps, problem{field, "is not an absolute URL; send one such as https://auth.example.com/oauth/token"})
	case u.User != nil:
		return append(ps, problem{field, "contains a user name or password; remove it and send client_id and client_secret instead"})
	case strings.Contains(s, "#"):
		return append(ps, problem{field, "has a fragment; remove the #… part"})
	case issuer && (u.RawQuery != "" || u.ForceQuery):
		return append(ps, problem{field, "has a query; an issuer has none (RFC 8414)"})
	case u.Scheme == "https":
	case u.Scheme == "http":
		if !IsLoopbackHost(u.Hostname()) {
			return append(ps, problem{field, "uses http; use https (http is allowed only for localhost, 127.0.0.0/8 and ::1)"})
		}
	default:
		return append(ps, problem{field, fmt.Sprintf("has the scheme %s; use https", quote(u.Scheme))})
	}
	return ps
}

// IsLoopbackHost reports whether host (a URL's Hostname) is localhost or a
// loopback address: the only hosts a token endpoint may reach over plain
// http.
func IsLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Unmap().IsLoopback()
}

// validScope reports whether s is an RFC 6749 scope-token:
// 1*( %x21 / %x23-5B / %x5D-7E ).
func validScope(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x21 || c > 0x7e || c == '"' || c == '\\' {
			return false
		}
	}
	return s != ""
}

// MarshalJSON encodes t, tokens included, with its time in UTC.
func (t RegisterToken) MarshalJSON() ([]byte, error) {
	type wire RegisterToken // without methods, so no recursion
	w := wire(t)
	w.ExpiresAt = w.ExpiresAt.UTC()
	return json.Marshal(w)
}

// MarshalJSON encodes r with its time in UTC.
func (r RegisterReply) MarshalJSON() ([]byte, error) {
	type wire RegisterReply
	w := wire(r)
	w.ExpiresAt = w.ExpiresAt.UTC()
	return json.Marshal(w)
}

func redacted(secret string) string {
	if secret == "" {
		return "none"
	}
	return "REDACTED"
}

func fingerprintOrNone(tok string) string {
	if tok == "" {
		return "none"
	}
	return Fingerprint(tok)
}

// String describes t without its tokens: the access token by fingerprint.
func (t RegisterToken) String() string {
	return fmt.Sprintf("RegisterToken{access_token:REDACTED fingerprint:%s token_type:%s refresh_token:%s expires_in:%d expires_at:%s}",
		fingerprintOrNone(t.AccessToken), t.TokenType, redacted(t.RefreshToken), t.ExpiresIn, timeOrNone(t.ExpiresAt))
}

// GoString describes t in Go syntax without its tokens.
func (t RegisterToken) GoString() string {
	return fmt.Sprintf("events.RegisterToken{AccessToken:\"REDACTED\", Fingerprint:%q, TokenType:%q, RefreshToken:%q, ExpiresIn:%d, ExpiresAt:%q}",
		fingerprintOrNone(t.AccessToken), t.TokenType, redacted(t.RefreshToken), t.ExpiresIn, timeOrNone(t.ExpiresAt))
}

// Format makes every fmt verb print String (%#v: GoString), never a token.
func (t RegisterToken) Format(f fmt.State, verb rune) {
	formatRedacted(f, verb, t.String(), t.GoString())
}

// LogValue logs t without its tokens: the access token by fingerprint, the
// refresh token only as present or not.
func (t RegisterToken) LogValue() slog.Value {
	attrs := []slog.Attr{
		slog.String("fingerprint", fingerprintOrNone(t.AccessToken)),
		slog.String("token_type", t.TokenType),
		slog.Bool("refresh_token", t.RefreshToken != ""),
	}
	if t.ExpiresIn != 0 {
		attrs = append(attrs, slog.Int64("expires_in", t.ExpiresIn))
	}
	if !t.ExpiresAt.IsZero() {
		attrs = append(attrs, slog.Time("expires_at", t.ExpiresAt))
	}
	return slog.GroupValue(attrs...)
}

// redactURL drops any password from a URL before it is printed; a URL that
// does not parse is not printed at all, as it might hold one.
func redactURL(s string) string {
	if s == "" {
		return ""
	}
	u, err := url.Parse(s)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}

// String describes r without its tokens and client secret.
func (r RegisterRequest) String() string {
	return fmt.Sprintf("RegisterRequest{token:%v token_endpoint:%s issuer:%s client_id:%s client_secret:%s auth_style:%s grant:%s scopes:%q resource:%s}",
		r.Token, redactURL(r.TokenEndpoint), redactURL(r.Issuer), r.ClientID, redacted(r.ClientSecret), r.AuthStyle, r.Grant, r.Scopes, r.Resource)
}

// GoString describes r in Go syntax without its tokens and client secret.
func (r RegisterRequest) GoString() string {
	return fmt.Sprintf("events.RegisterRequest{Token:%#v, TokenEndpoint:%q, Issuer:%q, ClientID:%q, ClientSecret:%q, AuthStyle:%q, Grant:%q, Scopes:%#v, Resource:%q}",
		r.Token, redactURL(r.TokenEndpoint), redactURL(r.Issuer), r.ClientID, redacted(r.ClientSecret), r.AuthStyle, r.Grant, r.Scopes, r.Resource)
}

// Format makes every fmt verb print String (%#v: GoString), never a secret.
func (r RegisterRequest) Format(f fmt.State, verb rune) {
	formatRedacted(f, verb, r.String(), r.GoString())
}

// LogValue logs r without its tokens and client secret.
func (r RegisterRequest) LogValue() slog.Value {
	return slog.GroupValue(
		slog.Any("token", r.Token),
		slog.String("token_endpoint", redactURL(r.TokenEndpoint)),
		slog.String("issuer", redactURL(r.Issuer)),
		slog.String("client_id", r.ClientID),
		slog.Bool("client_secret", r.ClientSecret != ""),
		slog.String("auth_style", r.AuthStyle),
		slog.String("grant", r.Grant),
		slog.Any("scopes", r.Scopes),
		slog.String("resource", r.Resource),
	)
}
