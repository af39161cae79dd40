package kv

import (
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/authbus/authbus/events"
)

// State is where a credential stands: usable, or waiting for a person.
type State string

const (
	// StateActive: the credential can be refreshed and its token served.
	StateActive State = "active"
	// StateNeedsReauth: refresh is impossible until a person logs in again
	// and re-registers; Reason says why.
	StateNeedsReauth State = "needs_reauth"
)

// Credential is the in-memory record of one credential. It is a plain value:
// not safe for concurrent mutation; Clone it to hand a copy to another
// goroutine.
type Credential struct {
	Key           events.Key
	Version       int64     // 1 at first registration, +1 per rotation or re-registration
	AccessToken   Secret    // sealed at rest (since schema 2); served by auth.token
	TokenType     string    // as the server gave it, e.g. "Bearer"
	Fingerprint   string    // of AccessToken
	ExpiresAt     time.Time // absolute; zero = no expiry
	ReceivedAt    time.Time // when the current token was received
	RefreshToken  Secret    // sealed at rest
	ClientSecret  Secret    // sealed at rest
	TokenEndpoint string
	ClientID      string
	AuthStyle     string // "basic" | "post"
	Grant         string // "refresh_token" | "client_credentials"
	Scopes        []string
	Resource      string // RFC 8707 resource indicator
	State         State
	Reason        string // needs_reauth reason (OAuth error code or our own, e.g. no_refresh_token)
	Description   string // error_description as the server gave it
	UpdatedAt     time.Time
	// ScheduledFor is when the credential's pending proactive refresh
	// fires, as the refresher that stored this record wrote or kept it;
	// zero when that refresher did not say. It is a hint that spares a
	// rotation the schedule write while an earlier schedule still fires in
	// time, never proof that one is pending.
	ScheduledFor time.Time
}

// Valid reports whether the access token may be served at now: the
// credential is active and its token has not expired.
func (c *Credential) Valid(now time.Time) bool {
	return c.State == StateActive && (c.ExpiresAt.IsZero() || now.Before(c.ExpiresAt))
}

// Tokens are the tokens of a new generation of a credential, as a token
// endpoint or a login handed them over.
type Tokens struct {
	AccessToken  string
	TokenType    string    // "" means "Bearer"
	RefreshToken string    // "" keeps the current one (RFC 6749 §6)
	ExpiresAt    time.Time // absolute; zero means no expiry
}

// NewGeneration puts t in force as c's next generation, received at now:
// the version grows by one, the fingerprint, expiry and receipt time are
// t's, and the credential is active again (a needs_reauth is repaired by
// the new tokens). It is the one place that says what a new generation is,
// for a rotation and a registration alike; a registration builds c afresh,
// so an empty refresh token stays empty there.
func (c *Credential) NewGeneration(t Tokens, now time.Time) {
	now = now.UTC()
	c.Version++
	c.AccessToken = Secret(t.AccessToken)
	c.TokenType = t.TokenType
	if c.TokenType == "" {
		c.TokenType = "Bearer"
	}
	c.Fingerprint = events.Fingerprint(t.AccessToken)
	c.ReceivedAt = now
	c.ExpiresAt = time.Time{}
	if !t.ExpiresAt.IsZero() {
		c.ExpiresAt = t.ExpiresAt.UTC()
	}
	if t.RefreshToken != "" {
		c.RefreshToken = Secret(t.RefreshToken)
	}
	c.State, c.Reason, c.Description = StateActive, "", ""
	c.UpdatedAt = now
}

// Clone returns a deep copy of c.
func (c *Credential) Clone() *Credential {
	if c == nil {
		return nil
	}
	cp := *c
	cp.Scopes = slices.Clone(c.Scopes)
	return &cp
}

// recordSchema versions the stored form, so that a later change of layout
// can be read next to records written by older refreshers. Schema 2 sealed
// the access token too (schema 1 stored it in plain text, and a store file
// is then as good as the token). Schema 3 binds each sealed value to its
// field as well as to the credential key (see sealAD). Records of schemas 1
// and 2 are still read, and written as schema 3 on their next write.
const recordSchema = 3

// The sealed fields of a record, as named in the additional data.
const (
	fieldAccessToken  = "access_token"
	fieldRefreshToken = "refresh_token"
	fieldClientSecret = "client_secret"
)

// sealAD is the additional data a value of field is sealed with in a
// record of schema for key k. Schemas 1 and 2 bound only the key: anyone
// who can write the bucket could swap two sealed fields of one record, and
// auth.token would serve the refresh token as the access token. Schema 3
// binds the record schema, the key and the field, so a value opens only in
// the place it was sealed for, and a record relabelled as an older schema
// does not open either (its values were sealed with schema 3's data). The
// parts are joined with NUL, which no key or field contains.
func sealAD(schema int, k events.Key, field string) []byte {
	if schema < 3 {
		return []byte(k.String())
	}
	return []byte(fmt.Sprintf("authbus credential schema %d\x00%s\x00%s", schema, k, field))
}

// record is the stored JSON form of a Credential. The key is not stored: it
// is the KV key, and it is part of the seal's additional data, so a record
// copied to another key no longer opens.
type record struct {
	Schema        int       `json:"schema"`
	Version       int64     `json:"version"`
	AccessToken   string    `json:"access_token,omitempty"` // schema 1 only
	SealedAccess  *Sealed   `json:"sealed_access_token,omitempty"`
	TokenType     string    `json:"token_type,omitempty"`
	Fingerprint   string    `json:"fingerprint,omitempty"`
	ExpiresAt     time.Time `json:"expires_at,omitzero"`
	ReceivedAt    time.Time `json:"received_at,omitzero"`
	RefreshToken  *Sealed   `json:"refresh_token,omitempty"`
	ClientSecret  *Sealed   `json:"client_secret,omitempty"`
	TokenEndpoint string    `json:"token_endpoint,omitempty"`
	ClientID      string    `json:"client_id,omitempty"`
	AuthStyle     string    `json:"auth_style,omitempty"`
	Grant         string    `json:"grant,omitempty"`
	Scopes        []string  `json:"scopes,omitempty"`
	Resource      string    `json:"resource,omitempty"`
	State         State     `json:"state"`
	Reason        string    `json:"reason,omitempty"`
	Description   string    `json:"error_description,omitempty"`
	UpdatedAt     time.Time `json:"updated_at,omitzero"`
	ScheduledFor  time.Time `json:"scheduled_for,omitzero"`
}

// encodeCredential seals c's access token, refresh token and client secret
// and returns the bytes to store.
func encodeCredential(ring *KeyRing, c *Credential) ([]byte, error) {
	seal := func(field string, s Secret) (*Sealed, error) {
		if s.IsZero() {
			return nil, nil
		}
		sealed, err := ring.Seal([]byte(s.Reveal()), sealAD(recordSchema, c.Key, field))
		return &sealed, err
	}
	at, err := seal(fieldAccessToken, c.AccessToken)
	if err != nil {
		return nil, err
	}
	rt, err := seal(fieldRefreshToken, c.RefreshToken)
	if err != nil {
		return nil, err
	}
	cs, err := seal(fieldClientSecret, c.ClientSecret)
	if err != nil {
		return nil, err
	}
	return json.Marshal(record{
		Schema:        recordSchema,
		Version:       c.Version,
		SealedAccess:  at,
		TokenType:     c.TokenType,
		Fingerprint:   c.Fingerprint,
		ExpiresAt:     c.ExpiresAt,
		ReceivedAt:    c.ReceivedAt,
		RefreshToken:  rt,
		ClientSecret:  cs,
		TokenEndpoint: c.TokenEndpoint,
		ClientID:      c.ClientID,
		AuthStyle:     c.AuthStyle,
		Grant:         c.Grant,
		Scopes:        c.Scopes,
		Resource:      c.Resource,
		State:         c.State,
		Reason:        c.Reason,
		Description:   c.Description,
		UpdatedAt:     c.UpdatedAt,
		ScheduledFor:  c.ScheduledFor,
	})
}

// decodeCredential parses stored bytes of key k and opens its secrets.
func decodeCredential(ring *KeyRing, k events.Key, data []byte) (*Credential, error) {
	var r record
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("stored record is not valid JSON: %w", err)
	}
	if r.Schema < 1 || r.Schema > recordSchema {
		return nil, fmt.Errorf("stored record has schema %d, this build reads schemas 1 to %d; run a refresher version that knows it", r.Schema, recordSchema)
	}
	open := func(field string, s *Sealed) (Secret, error) {
		if s == nil {
			return "", nil
		}
		pt, err := ring.Open(*s, sealAD(r.Schema, k, field))
		if err != nil {
			return "", fmt.Errorf("%s: %w", field, err)
		}
		return Secret(pt), nil
	}
	if r.Schema > 1 && r.AccessToken != "" {
		// Only schema 1 kept the access token in plain text; a later
		// record with one was written by something else.
		return nil, fmt.Errorf("%w: stored record of schema %d has a plain-text access token", ErrUnseal, r.Schema)
	}
	at := Secret(r.AccessToken) // schema 1
	if r.SealedAccess != nil {
		var err error
		if at, err = open(fieldAccessToken, r.SealedAccess); err != nil {
			return nil, err
		}
	}
	rt, err := open(fieldRefreshToken, r.RefreshToken)
	if err != nil {
		return nil, err
	}
	cs, err := open(fieldClientSecret, r.ClientSecret)
	if err != nil {
		return nil, err
	}
	return &Credential{
		Key:           k,
		Version:       r.Version,
		AccessToken:   at,
		TokenType:     r.TokenType,
		Fingerprint:   r.Fingerprint,
		ExpiresAt:     r.ExpiresAt,
		ReceivedAt:    r.ReceivedAt,
		RefreshToken:  rt,
		ClientSecret:  cs,
		TokenEndpoint: r.TokenEndpoint,
		ClientID:      r.ClientID,
		AuthStyle:     r.AuthStyle,
		Grant:         r.Grant,
		Scopes:        r.Scopes,
		Resource:      r.Resource,
		State:         r.State,
		Reason:        r.Reason,
		Description:   r.Description,
		UpdatedAt:     r.UpdatedAt,
		ScheduledFor:  r.ScheduledFor,
	}, nil
}
