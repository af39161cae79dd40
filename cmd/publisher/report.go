package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/events"
)

// reportFlags are what 401 and expiring share: which token the report is
// about, and whether to wait for the outcome.
type reportFlags struct {
	fingerprint, accessToken string
	asJSON                   bool
	wait                     time.Duration
}

func (r *reportFlags) define(f *cmdFlags, what string) {
	f.StringVar(&r.fingerprint, "fingerprint", "", "fingerprint of the token that "+what+" (16 hex characters)")
	f.StringVar(&r.accessToken, "access-token", "", "the token that "+what+"; only its fingerprint is sent")
	f.bind("access-token", "AUTHBUS_ACCESS_TOKEN")
	f.BoolVar(&r.asJSON, "json", false, "print the publish result (and with --wait, the outcome) as JSON")
	f.DurationVar(&r.wait, "wait", 0, "wait this long for the outcome: exit 0 once a newer token is announced, 4 on needs_reauth (0: do not wait)")
}

// check refuses contradictory or malformed token flags before anything
// is sent.
func (r *reportFlags) check() error {
	switch {
	case r.fingerprint != "" && r.accessToken != "":
		return usageErrorf("give --fingerprint or --access-token, not both")
	case r.fingerprint != "" && !events.ValidFingerprint(r.fingerprint):
		return usageErrorf("--fingerprint: want 16 lowercase hex characters, the fingerprint of the token, never the token itself (use --access-token for that)")
	case r.wait < 0:
		return usageErrorf("--wait %v: give a positive duration such as 30s, or 0 not to wait", r.wait)
	}
	return nil
}

// tokenFingerprint resolves which token the report is about: --fingerprint,
// else the fingerprint of --access-token, else the current token (asked of
// the token service), whose reply is also returned.
func (r *reportFlags) tokenFingerprint(ctx context.Context, c *client, k events.Key) (string, *events.Rotated, error) {
	switch {
	case r.fingerprint != "":
		return r.fingerprint, nil, nil
	case r.accessToken != "":
		return events.Fingerprint(r.accessToken), nil, nil
	}
	var cur events.Rotated
	if err := c.request(ctx, "token", k, nil, &cur); err != nil {
		return "", nil, fmt.Errorf("no --fingerprint or --access-token given, and the current token could not be read: %w", err)
	}
	return cur.Fingerprint, &cur, nil
}

func unauthorized(ctx context.Context, args []string, s streams) error {
	f := newFlags("401", "401 [flags] KEY", `
Report that a request with the token of KEY got HTTP 401, through JetStream
with the Nats-Msg-Id that collapses a storm of 401s for one token into one
refresh. The token is named by --fingerprint or --access-token (only its
fingerprint is sent); with neither, the current token is meant, which makes
the refreshers refresh it now.`, s)
	var r reportFlags
	r.define(f, "got 401")
	var ev events.Unauthorized
	host, _ := os.Hostname()
	f.StringVar(&ev.Runtime, "runtime", "publisher@"+host, "who saw the 401")
	f.IntVar(&ev.Status, "status", 401, "HTTP status seen")
	f.StringVar(&ev.URL, "url", "", "URL of the request that got 401 (its query and credentials are dropped)")
	if err := f.parse(args); err != nil {
		return err
	}
	key, err := f.oneKey()
	if err != nil {
		return err
	}
	if ev.URL, err = cleanURL(ev.URL); err != nil {
		return err
	}
	return report(ctx, f, key, &r, func(fp string, _ *events.Rotated) (events.Payload, error) {
		ev.Fingerprint = fp
		ev.ObservedAt = time.Now().UTC()
		return ev, ev.Validate()
	})
}

func expiring(ctx context.Context, args []string, s streams) error {
	f := newFlags("expiring", "expiring [flags] KEY", `
Report that the token of KEY expires soon. The refreshers refresh it only
when it is due (within the refresh lead of its expiry), otherwise they
acknowledge it as not due. The token is named by --fingerprint or
--access-token; with neither, the current token and its expiry are used.
A report that is not due is acknowledged silently, so --wait then times out.`, s)
	var r reportFlags
	r.define(f, "expires")
	expiresAt := f.String("expires-at", "", "when the token expires, RFC 3339 (default: the current token's expiry)")
	if err := f.parse(args); err != nil {
		return err
	}
	key, err := f.oneKey()
	if err != nil {
		return err
	}
	var at time.Time
	if *expiresAt != "" {
		if at, err = time.Parse(time.RFC3339, *expiresAt); err != nil {
			return usageErrorf("--expires-at %q: not RFC 3339; write it like 2026-11-23T20:00:00Z", *expiresAt)
		}
	}
	if at.IsZero() && (r.fingerprint != "" || r.accessToken != "") {
		return usageErrorf("say when that token expires with --expires-at (RFC 3339)")
	}
	return report(ctx, f, key, &r, func(fp string, cur *events.Rotated) (events.Payload, error) {
		if at.IsZero() && cur != nil {
			at = cur.ExpiresAt
		}
		if at.IsZero() {
			return nil, usageErrorf("the current token has no expiry; say when it expires with --expires-at (RFC 3339)")
		}
		ev := events.Expiring{Fingerprint: fp, ExpiresAt: at.UTC()}
		return ev, ev.Validate()
	})
}

// publishResult is the --json output of 401 and expiring.
type publishResult struct {
	Subject     string `json:"subject"`
	MsgID       string `json:"msg_id"`
	Fingerprint string `json:"fingerprint"`
	Stream      string `json:"stream"`
	Sequence    uint64 `json:"sequence"`
	// Duplicate: the stream already had this report in its duplicate
	// window; the refreshers are handling that one.
	Duplicate bool     `json:"duplicate"`
	Outcome   *outcome `json:"outcome,omitempty"`
}

// outcome is what --wait saw: the rotation or the needs_reauth that
// answered the report. It never holds the access token.
type outcome struct {
	Type        events.Type `json:"type"`
	Version     int64       `json:"version"`
	Fingerprint string      `json:"fingerprint,omitempty"`
	ExpiresAt   time.Time   `json:"expires_at,omitzero"`
	Reason      string      `json:"reason,omitempty"`
	Description string      `json:"error_description,omitempty"`
}

// report publishes the event build makes for key and, with --wait, waits
// for the announcement that answers it.
func report(ctx context.Context, f *cmdFlags, key events.Key, r *reportFlags, build func(fp string, cur *events.Rotated) (events.Payload, error)) error {
	if err := r.check(); err != nil {
		return err
	}
	c, err := f.connect()
	if err != nil {
		return err
	}
	defer c.close()
	fp, cur, err := r.tokenFingerprint(ctx, c, key)
	if err != nil {
		return err
	}
	p, err := build(fp, cur)
	if err != nil {
		return usageErrorf("%w", err)
	}
	// Subscribe before publishing, so a quick answer is not missed.
	var answers chan *nats.Msg
	if r.wait > 0 {
		answers = make(chan *nats.Msg, 64)
		for _, t := range []events.Type{events.TypeRotated, events.TypeNeedsReauth} {
			sub, err := c.nc.ChanSubscribe(c.g.subj.Event(t, key), answers)
			if err != nil {
				return fmt.Errorf("subscribe %s: %w", c.g.subj.Event(t, key), err)
			}
			defer sub.Unsubscribe() //nolint:errcheck // the connection closes next
		}
		if err := c.nc.Flush(); err != nil {
			return fmt.Errorf("subscribe for --wait: %w", err)
		}
	}
	ack, subject, err := c.publishEvent(ctx, key, p, fp)
	if err != nil {
		return err
	}
	res := publishResult{Subject: subject, MsgID: events.MsgID(p.EventType(), key, fp), Fingerprint: fp,
		Stream: ack.Stream, Sequence: ack.Sequence, Duplicate: ack.Duplicate}
	if !r.asJSON {
		if ack.Duplicate {
			fmt.Fprintf(f.s.out, "published %s: duplicate of a report for the same token in the de-duplication window (already being handled)\n", subject)
		} else {
			fmt.Fprintf(f.s.out, "published %s: stream %s sequence %d\n", subject, ack.Stream, ack.Sequence)
		}
	}
	if r.wait > 0 {
		res.Outcome, err = awaitOutcome(ctx, c, key, fp, answers, r.wait)
		if err != nil && !errors.Is(err, errReauth) {
			return err
		}
		if !r.asJSON {
			printOutcome(f.s, res.Outcome)
		}
	}
	if r.asJSON {
		if jerr := writeJSON(f.s, res); jerr != nil {
			return jerr
		}
	}
	if res.Outcome != nil && res.Outcome.Type == events.TypeNeedsReauth {
		return fmt.Errorf("%s: %w (%s); log in again and register the new tokens", key, errReauth, res.Outcome.Reason)
	}
	return nil
}

// awaitOutcome waits for the auth.rotated of a token other than fp (the
// refresh, or the re-announcement of a newer token) or an auth.needs_reauth.
// A re-announcement of fp itself (an expiring that was not due) does not
// end the wait.
func awaitOutcome(ctx context.Context, c *client, key events.Key, fp string, answers <-chan *nats.Msg, d time.Duration) (*outcome, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no new token or needs_reauth for %s within --wait %v: the refresh may still be running or retrying (see publisher watch, publisher status)", key, d)
		case msg := <-answers:
			t, _, err := c.g.subj.ParseEvent(msg.Subject)
			if err != nil {
				continue
			}
			ev, err := events.Decode(t, key, msg.Data)
			switch {
			case err != nil:
				continue
			case ev.Rotated != nil && ev.Rotated.Fingerprint != fp:
				return &outcome{Type: t, Version: ev.Rotated.Version, Fingerprint: ev.Rotated.Fingerprint, ExpiresAt: ev.Rotated.ExpiresAt}, nil
			case ev.NeedsReauth != nil:
				return &outcome{Type: t, Version: ev.NeedsReauth.Version, Reason: ev.NeedsReauth.Reason, Description: ev.NeedsReauth.ErrorDescription}, errReauth
			}
		}
	}
}

func printOutcome(s streams, o *outcome) {
	if o.Type == events.TypeNeedsReauth {
		fmt.Fprintf(s.out, "needs_reauth: version %d, reason %s: %s\n", o.Version, o.Reason, o.Description)
		return
	}
	exp := "never"
	if !o.ExpiresAt.IsZero() {
		exp = o.ExpiresAt.UTC().Format(time.RFC3339)
	}
	fmt.Fprintf(s.out, "rotated: version %d, fingerprint %s, expires %s\n", o.Version, o.Fingerprint, exp)
}

// cleanURL drops what may hold secrets from a reported URL (user info,
// query, fragment) and keeps it within the protocol's limit.
func cleanURL(raw string) (string, error) {
	if raw == "" {
		return "", nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		// Not repeated: the URL may hold secrets.
		return "", usageErrorf("--url: cannot be parsed as a URL; give the URL of the request that got 401, or leave it out")
	}
	u.User, u.RawQuery, u.ForceQuery, u.Fragment, u.RawFragment = nil, "", false, "", ""
	s := u.String()
	if len(s) > events.MaxURLLen {
		s = s[:events.MaxURLLen]
	}
	return s, nil
}
