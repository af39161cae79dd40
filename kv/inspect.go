package kv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
)

// CredentialInfo is what a person may see of a credential: the public
// fields of its record and who holds its refresh lease. It holds no token
// and no secret, sealed or not, so reading it needs no seal key.
type CredentialInfo struct {
	Key             events.Key
	Revision        uint64 // of the record in the credential bucket
	Version         int64
	State           State
	Reason          string // needs_reauth reason
	Description     string // error_description as the server gave it
	Fingerprint     string
	TokenType       string
	ExpiresAt       time.Time // zero: no expiry
	ReceivedAt      time.Time // when the token in force was received: last rotation or registration
	UpdatedAt       time.Time // last change of the record
	TokenEndpoint   string    // without user info, query or fragment, which may hold secrets
	ClientID        string
	AuthStyle       string
	Grant           string
	Scopes          []string
	Resource        string
	HasRefreshToken bool
	LastFailure     *Failure // the last failed refresh of the generation in force, if any
	LeaseHolder     string   // the refresher that holds the refresh lease; "" when free
}

// Inspector reads CredentialInfo from the credential, lease and failure
// buckets of a deployment. It needs read access to them and no seal key:
// it never opens a sealed field. It is safe for concurrent use.
type Inspector struct {
	creds, leases jetstream.KeyValue
	failures      jetstream.KeyValue // nil for a deployment whose refreshers keep none
}

// OpenInspector opens the credential and lease buckets named by subj. A
// bucket that does not exist is an error wrapping
// jetstream.ErrBucketNotFound: no refresher has run with that prefix.
func OpenInspector(ctx context.Context, js jetstream.JetStream, subj events.Subjects) (*Inspector, error) {
	in := &Inspector{}
	for _, b := range []struct {
		name string
		kv   *jetstream.KeyValue
	}{{subj.CredentialsBucket(), &in.creds}, {subj.LeasesBucket(), &in.leases}} {
		bucket, err := js.KeyValue(ctx, b.name)
		if errors.Is(err, jetstream.ErrBucketNotFound) {
			return nil, fmt.Errorf("bucket %s not found (%w)", b.name, err)
		}
		if err != nil {
			return nil, fmt.Errorf("open bucket %s: %w", b.name, err)
		}
		*b.kv = bucket
	}
	// Refreshers older than the failure bucket do not create it.
	failures, err := js.KeyValue(ctx, subj.FailuresBucket())
	switch {
	case err == nil:
		in.failures = failures
	case !errors.Is(err, jetstream.ErrBucketNotFound):
		return nil, fmt.Errorf("open bucket %s: %w", subj.FailuresBucket(), err)
	}
	return in, nil
}

// Inspect returns the credentials whose keys match any of patterns (key
// filters with NATS wildcards: "acme.>", "acme.*.github", a plain key),
// sorted by key. Entries of the bucket that are not credential keys are
// skipped. ctx bounds the whole read.
func (in *Inspector) Inspect(ctx context.Context, patterns ...string) ([]CredentialInfo, error) {
	records, err := latest(ctx, in.creds, patterns)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", in.creds.Bucket(), err)
	}
	held, err := latest(ctx, in.leases, patterns)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", in.leases.Bucket(), err)
	}
	failed := map[string]jetstream.KeyValueEntry{}
	if in.failures != nil {
		if failed, err = latest(ctx, in.failures, patterns); err != nil {
			return nil, fmt.Errorf("read %s: %w", in.failures.Bucket(), err)
		}
	}
	list := make([]CredentialInfo, 0, len(records))
	for _, name := range slices.Sorted(maps.Keys(records)) {
		e := records[name]
		k, err := events.ParseKey(name)
		if err != nil {
			continue // not a credential key: written by something else
		}
		info, err := publicInfo(k, e.Value())
		if err != nil {
			return nil, fmt.Errorf("credential %s (revision %d): %w", k, e.Revision(), err)
		}
		info.Revision = e.Revision()
		if l, ok := held[name]; ok {
			info.LeaseHolder = string(l.Value())
		}
		if e, ok := failed[name]; ok {
			var f Failure
			// Only a note about the generation in force is shown; an
			// unreadable one is someone else's and skipped.
			if json.Unmarshal(e.Value(), &f) == nil && f.Version == info.Version && f.Fingerprint == info.Fingerprint {
				info.LastFailure = &f
			}
		}
		list = append(list, info)
	}
	return list, nil
}

// publicInfo decodes a stored record of key k without opening its sealed
// fields: the refresh token only by presence.
func publicInfo(k events.Key, data []byte) (CredentialInfo, error) {
	var r record
	if err := json.Unmarshal(data, &r); err != nil {
		return CredentialInfo{}, fmt.Errorf("stored record is not valid JSON: %w", err)
	}
	if r.Schema != 1 && r.Schema != recordSchema {
		return CredentialInfo{}, fmt.Errorf("stored record has schema %d, this build reads schemas 1 and %d; use the authbus version of the refreshers", r.Schema, recordSchema)
	}
	return CredentialInfo{
		Key: k, Version: r.Version, State: r.State, Reason: r.Reason, Description: r.Description,
		Fingerprint: r.Fingerprint, TokenType: r.TokenType,
		ExpiresAt: r.ExpiresAt.UTC(), ReceivedAt: r.ReceivedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC(),
		TokenEndpoint: safeURL(r.TokenEndpoint), ClientID: r.ClientID, AuthStyle: r.AuthStyle, Grant: r.Grant,
		Scopes: r.Scopes, Resource: safeURL(r.Resource), HasRefreshToken: r.RefreshToken != nil,
	}, nil
}

// safeURL drops user info, query and fragment, which may hold secrets.
func safeURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || raw == "" {
		return ""
	}
	u.User, u.RawQuery, u.ForceQuery, u.Fragment, u.RawFragment = nil, "", false, "", ""
	return u.String()
}

// latest returns the current entries of the keys matching patterns, by
// key: an ordered consumer per pattern rather than a request per key.
// Patterns may overlap; NATS refuses overlapping filters in one consumer.
func latest(ctx context.Context, b jetstream.KeyValue, patterns []string) (map[string]jetstream.KeyValueEntry, error) {
	out := map[string]jetstream.KeyValueEntry{}
	for _, pat := range patterns {
		if err := latestOf(ctx, b, pat, out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func latestOf(ctx context.Context, b jetstream.KeyValue, pattern string, out map[string]jetstream.KeyValueEntry) error {
	w, err := b.WatchFiltered(ctx, []string{pattern}, jetstream.IgnoreDeletes())
	if err != nil {
		return err
	}
	defer w.Stop() //nolint:errcheck // nothing to do about a failed unsubscribe
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("listing %s: %w; allow more time for many credentials", pattern, ctx.Err())
		case e, ok := <-w.Updates():
			switch {
			case !ok:
				return fmt.Errorf("listing %s: the watcher stopped early; retry", pattern)
			case e == nil: // the initial values are all in
				return nil
			}
			out[e.Key()] = e
		}
	}
}
