package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
)

func status(ctx context.Context, args []string, s streams) error {
	f := newFlags("status", "status [flags] [KEY|TENANT|PATTERN…]", `
Show credentials: version, state (and the needs_reauth reason), when the
token expires, when the token in force was received (the last rotation or
registration), whether a refresher holds its refresh lease, and when the
pending proactive refresh fires. No token or secret is ever shown.

With one KEY, the details of that credential (exit 3 if it is not
registered); with a tenant (acme) or a pattern (acme.*.github, acme.>), one
line per credential; with nothing, every credential.

status is an operator command: it reads the authbus buckets
(<PREFIX>_CREDENTIALS, <PREFIX>_LEASES) and the events stream directly, so it
needs a NATS user with JetStream access to them, but no seal key and no
running refresher.`, s)
	asJSON := f.Bool("json", false, "print a JSON array with one object per credential")
	if err := f.parse(args); err != nil {
		return err
	}
	patterns, err := keyPatterns(f.Args())
	if err != nil {
		return err
	}
	var single events.Key
	if f.NArg() == 1 {
		single, _ = events.ParseKey(f.Arg(0)) // zero unless a plain key
	}
	c, err := f.connect()
	if err != nil {
		return err
	}
	defer c.close()
	ctx, cancel := context.WithTimeout(ctx, c.g.timeout)
	defer cancel()
	list, err := readStatus(ctx, c, patterns)
	if err != nil {
		return err
	}
	switch {
	case *asJSON:
		if err := writeJSON(s, list); err != nil {
			return err
		}
	case single != (events.Key{}) && len(list) == 1:
		printDetail(s, list[0], time.Now())
	default:
		printTable(s, list, time.Now())
	}
	if len(list) == 0 {
		if single != (events.Key{}) {
			return fmt.Errorf("%s: %w; register it with \"publisher register\", or check --prefix", single, errNotRegistered)
		}
		fmt.Fprintf(s.errOut, "no credentials match %s\n", strings.Join(f.Args(), " "))
	}
	return nil
}

// credStatus is what status shows of one credential: its stored record
// without the access token and sealed secrets, its lease and its schedule.
type credStatus struct {
	Key             string    `json:"key"`
	Version         int64     `json:"version"`
	State           string    `json:"state"`
	Reason          string    `json:"reason,omitempty"`
	Description     string    `json:"error_description,omitempty"`
	Fingerprint     string    `json:"fingerprint"`
	TokenType       string    `json:"token_type,omitempty"`
	ExpiresAt       time.Time `json:"expires_at,omitzero"`
	ExpiresIn       *int64    `json:"expires_in,omitempty"` // seconds, negative once expired; absent without expiry
	ReceivedAt      time.Time `json:"received_at,omitzero"` // when the token in force was received: last rotation or registration
	UpdatedAt       time.Time `json:"updated_at,omitzero"`  // last change of the record
	Grant           string    `json:"grant,omitempty"`
	ClientID        string    `json:"client_id,omitempty"`
	TokenEndpoint   string    `json:"token_endpoint,omitempty"` // without user info or query
	HasRefreshToken bool      `json:"has_refresh_token"`
	LeaseHeld       bool      `json:"lease_held"`
	LeaseHolder     string    `json:"lease_holder,omitempty"`
	NextRefresh     time.Time `json:"next_refresh,omitzero"` // when the pending proactive refresh fires
	Revision        uint64    `json:"revision"`
}

// storedRecord is the part of the credential record (kv's stored JSON,
// schemas 1 and 2, which differ only in how the access token is kept) that
// status may show. The access token and the sealed secrets
// are deliberately not decoded; the refresh token only by presence.
type storedRecord struct {
	Schema        int             `json:"schema"`
	Version       int64           `json:"version"`
	TokenType     string          `json:"token_type"`
	Fingerprint   string          `json:"fingerprint"`
	ExpiresAt     time.Time       `json:"expires_at"`
	ReceivedAt    time.Time       `json:"received_at"`
	RefreshToken  json.RawMessage `json:"refresh_token"`
	TokenEndpoint string          `json:"token_endpoint"`
	ClientID      string          `json:"client_id"`
	Grant         string          `json:"grant"`
	State         string          `json:"state"`
	Reason        string          `json:"reason"`
	Description   string          `json:"error_description"`
	UpdatedAt     time.Time       `json:"updated_at"`
}

// recordSchema is the newest layout of the credential record this build
// reads; schema 1 reads the same for status.
const recordSchema = 2

// readStatus reads the credentials matching the key patterns, with their
// leases and schedules.
func readStatus(ctx context.Context, c *client, patterns []string) ([]credStatus, error) {
	js, err := jetstream.New(c.nc)
	if err != nil {
		return nil, err
	}
	subj := c.g.subj
	creds, err := openBucket(ctx, js, subj.CredentialsBucket(), subj)
	if err != nil {
		return nil, err
	}
	leases, err := openBucket(ctx, js, subj.LeasesBucket(), subj)
	if err != nil {
		return nil, err
	}
	work, err := js.Stream(ctx, subj.EventsStream())
	if err != nil {
		return nil, operatorError("stream "+subj.EventsStream(), subj, err)
	}
	records, err := latest(ctx, creds, patterns)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", creds.Bucket(), err)
	}
	held, err := latest(ctx, leases, patterns)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", leases.Bucket(), err)
	}
	now := time.Now()
	list := make([]credStatus, 0, len(records))
	for _, name := range slices.Sorted(maps.Keys(records)) {
		e := records[name]
		k, err := events.ParseKey(e.Key())
		if err != nil {
			continue // not a credential key: written by something else
		}
		var r storedRecord
		if err := json.Unmarshal(e.Value(), &r); err != nil {
			return nil, fmt.Errorf("credential %s (revision %d): stored record is not JSON: %w", k, e.Revision(), err)
		}
		if r.Schema != 1 && r.Schema != recordSchema {
			return nil, fmt.Errorf("credential %s: stored record has schema %d, this publisher reads schemas 1 and %d; use the publisher of the refreshers' authbus version", k, r.Schema, recordSchema)
		}
		st := credStatus{
			Key: k.String(), Version: r.Version, State: r.State, Reason: r.Reason, Description: r.Description,
			Fingerprint: r.Fingerprint, TokenType: r.TokenType, ExpiresAt: r.ExpiresAt.UTC(),
			ReceivedAt: r.ReceivedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC(), Grant: r.Grant, ClientID: r.ClientID,
			TokenEndpoint: safeURL(r.TokenEndpoint), HasRefreshToken: !isAbsent(r.RefreshToken), Revision: e.Revision(),
		}
		if !r.ExpiresAt.IsZero() {
			in := int64(r.ExpiresAt.Sub(now) / time.Second)
			st.ExpiresIn = &in
		}
		if l, ok := held[k.String()]; ok {
			st.LeaseHeld, st.LeaseHolder = true, string(l.Value())
		}
		if st.NextRefresh, err = nextRefresh(ctx, work, subj.Schedule(k)); err != nil {
			return nil, err
		}
		list = append(list, st)
	}
	return list, nil
}

func openBucket(ctx context.Context, js jetstream.JetStream, name string, subj events.Subjects) (jetstream.KeyValue, error) {
	b, err := js.KeyValue(ctx, name)
	if err != nil {
		return nil, operatorError("bucket "+name, subj, err)
	}
	return b, nil
}

// operatorError explains why an operator command cannot open a stream or
// bucket.
func operatorError(what string, subj events.Subjects, err error) error {
	if errors.Is(err, jetstream.ErrBucketNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) {
		return fmt.Errorf("%s not found: no refresher has run with subject prefix %q on this NATS account; check --prefix and --nats-url", what, subj.Prefix())
	}
	return fmt.Errorf("open %s: %w; this operator command needs a NATS user with JetStream access to the authbus streams and buckets", what, err)
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
			return fmt.Errorf("listing %s: %w; raise --timeout for many credentials", pattern, ctx.Err())
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

// nextRefresh returns when the pending schedule on subject fires, or the
// zero time when none is pending.
func nextRefresh(ctx context.Context, work jetstream.Stream, subject string) (time.Time, error) {
	msg, err := work.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("read the pending refresh %s: %w", subject, err)
	}
	at, ok := strings.CutPrefix(msg.Header.Get(jetstream.ScheduleHeader), "@at ")
	if !ok {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339, at)
	if err != nil {
		return time.Time{}, nil
	}
	return t.UTC(), nil
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

func printTable(s streams, list []credStatus, now time.Time) {
	if len(list) == 0 {
		return
	}
	w := tabwriter.NewWriter(s.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "KEY\tVERSION\tSTATE\tEXPIRES\tRECEIVED\tLEASE\tNEXT REFRESH")
	for _, c := range list {
		state := c.State
		if c.Reason != "" {
			state += " (" + c.Reason + ")"
		}
		fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%s\t%s\t%s\n", c.Key, c.Version, state, expiresText(c, now), ago(c.ReceivedAt, now), leaseText(c), ago(c.NextRefresh, now))
	}
	w.Flush()
}

func printDetail(s streams, c credStatus, now time.Time) {
	w := tabwriter.NewWriter(s.out, 0, 4, 2, ' ', 0)
	at := func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return t.Format(time.RFC3339) + " (" + ago(t, now) + ")"
	}
	state := c.State
	if c.Reason != "" {
		state += ": " + c.Reason
		if c.Description != "" {
			state += fmt.Sprintf(" %q", c.Description)
		}
	}
	rt := "yes"
	if !c.HasRefreshToken {
		rt = "no"
	}
	for _, row := range [][2]string{
		{"key", c.Key},
		{"version", fmt.Sprint(c.Version)},
		{"state", state},
		{"fingerprint", c.Fingerprint},
		{"expires", at(c.ExpiresAt)},
		{"received", at(c.ReceivedAt)},
		{"updated", at(c.UpdatedAt)},
		{"next refresh", at(c.NextRefresh)},
		{"lease", leaseText(c)},
		{"grant", c.Grant},
		{"client id", c.ClientID},
		{"token endpoint", c.TokenEndpoint},
		{"refresh token", rt},
	} {
		fmt.Fprintf(w, "%s:\t%s\n", row[0], row[1])
	}
	w.Flush()
}

func expiresText(c credStatus, now time.Time) string {
	if c.ExpiresAt.IsZero() {
		return "never"
	}
	return ago(c.ExpiresAt, now)
}

func leaseText(c credStatus) string {
	if !c.LeaseHeld {
		return "free"
	}
	return "held by " + c.LeaseHolder
}
