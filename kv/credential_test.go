package kv

import (
	"testing"
	"time"

	"github.com/authbus/authbus/events"
)

func TestNewGeneration(t *testing.T) {
	t.Parallel()
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.FixedZone("CEST", 2*3600))
	exp := now.Add(time.Hour)
	k := events.Key{Tenant: "acme", User: "alice", Server: "github"}

	t.Run("rotation carries the refresh token forward and repairs the state", func(t *testing.T) {
		t.Parallel()
		c := &Credential{Key: k, Version: 7, RefreshToken: "rt-old", TokenType: "DPoP", ExpiresAt: now,
			State: StateNeedsReauth, Reason: "invalid_grant", Description: "revoked"}
		c.NewGeneration(Tokens{AccessToken: "at-new", ExpiresAt: exp}, now)
		want := Credential{Key: k, Version: 8, AccessToken: "at-new", TokenType: "Bearer", Fingerprint: events.Fingerprint("at-new"),
			ExpiresAt: exp.UTC(), ReceivedAt: now.UTC(), RefreshToken: "rt-old", State: StateActive, UpdatedAt: now.UTC()}
		if !equalCredential(*c, want) {
			t.Errorf("got %+v\nwant %+v", *c, want)
		}
	})
	t.Run("registration without a refresh token and without expiry", func(t *testing.T) {
		t.Parallel()
		c := &Credential{Key: k, ExpiresAt: now}
		c.NewGeneration(Tokens{AccessToken: "at", TokenType: "bearer"}, now)
		if c.Version != 1 || !c.RefreshToken.IsZero() || !c.ExpiresAt.IsZero() || c.TokenType != "bearer" || c.State != StateActive {
			t.Errorf("got %+v; want version 1, no refresh token, no expiry, token type as given, active", *c)
		}
		if c.ExpiresAt != (time.Time{}) {
			t.Errorf("ExpiresAt = %#v; want the zero time", c.ExpiresAt)
		}
	})
	t.Run("a new refresh token replaces the old", func(t *testing.T) {
		t.Parallel()
		c := &Credential{Key: k, RefreshToken: "rt-old"}
		c.NewGeneration(Tokens{AccessToken: "at", RefreshToken: "rt-new"}, now)
		if c.RefreshToken.Reveal() != "rt-new" {
			t.Errorf("refresh token not replaced")
		}
	})
}

func equalCredential(a, b Credential) bool {
	return a.Key == b.Key && a.Version == b.Version && a.AccessToken == b.AccessToken && a.TokenType == b.TokenType &&
		a.Fingerprint == b.Fingerprint && a.ExpiresAt.Equal(b.ExpiresAt) && a.ExpiresAt.Location() == b.ExpiresAt.Location() &&
		a.ReceivedAt.Equal(b.ReceivedAt) && a.ReceivedAt.Location() == time.UTC && a.RefreshToken == b.RefreshToken &&
		a.State == b.State && a.Reason == b.Reason && a.Description == b.Description && a.UpdatedAt.Equal(b.UpdatedAt)
}
