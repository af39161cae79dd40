package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
)

func status(ctx context.Context, args []string, s streams) error {
	f := newFlags("status", "status [flags] [KEY|TENANT|PATTERN…]", `
Show credentials: version, state (and the needs_reauth reason), when the
token expires, when the token in force was received (the last rotation or
registration), whether a refresher holds its refresh lease, when the
pending proactive refresh fires, and, while a refresh of the current
version fails and is retried, the cause of the last failure and when the
next attempt is due. No token or secret is ever shown.

With one KEY, the details of that credential (exit 3 if it is not
registered); with a tenant (acme) or a pattern (acme.*.github, acme.>), one
line per credential; with nothing, every credential.

status is an operator command: it reads the authbus buckets (credentials,
leases, failures) and the events stream directly, so it
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
	Key             string      `json:"key"`
	Version         int64       `json:"version"`
	State           string      `json:"state"`
	Reason          string      `json:"reason,omitempty"`
	Description     string      `json:"error_description,omitempty"`
	Fingerprint     string      `json:"fingerprint"`
	TokenType       string      `json:"token_type,omitempty"`
	ExpiresAt       time.Time   `json:"expires_at,omitzero"`
	ExpiresIn       *int64      `json:"expires_in,omitempty"` // seconds, negative once expired; absent without expiry
	ReceivedAt      time.Time   `json:"received_at,omitzero"` // when the token in force was received: last rotation or registration
	UpdatedAt       time.Time   `json:"updated_at,omitzero"`  // last change of the record
	Grant           string      `json:"grant,omitempty"`
	ClientID        string      `json:"client_id,omitempty"`
	TokenEndpoint   string      `json:"token_endpoint,omitempty"` // without user info or query
	HasRefreshToken bool        `json:"has_refresh_token"`
	LeaseHeld       bool        `json:"lease_held"`
	LeaseHolder     string      `json:"lease_holder,omitempty"`
	NextRefresh     time.Time   `json:"next_refresh,omitzero"`  // when the pending proactive refresh fires (after a storm of 401s, one an earlier generation kept, which fires early and writes the current one)
	LastFailure     *kv.Failure `json:"last_failure,omitempty"` // the last failed refresh of this version, and its retry
	Revision        uint64      `json:"revision"`
}

// readStatus reads the credentials matching the key patterns, with their
// leases and schedules: the record and lease through kv's Inspector, which
// needs no seal key, the schedule from the schedules stream (or, left by an
// earlier version, from the events stream).
func readStatus(ctx context.Context, c *client, patterns []string) ([]credStatus, error) {
	js, err := jetstream.New(c.nc)
	if err != nil {
		return nil, err
	}
	subj := c.g.subj
	in, err := kv.OpenInspector(ctx, js, subj)
	if err != nil {
		return nil, operatorError(err, subj)
	}
	work, err := js.Stream(ctx, subj.EventsStream())
	if err != nil {
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			err = fmt.Errorf("stream %s not found (%w)", subj.EventsStream(), err)
		} else {
			err = fmt.Errorf("open stream %s: %w", subj.EventsStream(), err)
		}
		return nil, operatorError(err, subj)
	}
	// Refreshers of an earlier version kept the schedules in the events
	// stream only, and did not create this one.
	sched, err := js.Stream(ctx, subj.SchedulesStream())
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		sched = nil
	case err != nil:
		return nil, operatorError(fmt.Errorf("open stream %s: %w", subj.SchedulesStream(), err), subj)
	}
	infos, err := in.Inspect(ctx, patterns...)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("%w; raise --timeout for many credentials", err)
		}
		return nil, err
	}
	now := time.Now()
	list := make([]credStatus, 0, len(infos))
	for _, i := range infos {
		st := credStatus{
			Key: i.Key.String(), Version: i.Version, State: string(i.State), Reason: i.Reason, Description: i.Description,
			Fingerprint: i.Fingerprint, TokenType: i.TokenType, ExpiresAt: i.ExpiresAt, ReceivedAt: i.ReceivedAt,
			UpdatedAt: i.UpdatedAt, Grant: i.Grant, ClientID: i.ClientID, TokenEndpoint: i.TokenEndpoint,
			HasRefreshToken: i.HasRefreshToken, LeaseHeld: i.LeaseHolder != "", LeaseHolder: i.LeaseHolder,
			LastFailure: i.LastFailure, Revision: i.Revision,
		}
		if !i.ExpiresAt.IsZero() {
			in := int64(i.ExpiresAt.Sub(now) / time.Second)
			st.ExpiresIn = &in
		}
		if sched != nil {
			if st.NextRefresh, err = nextRefresh(ctx, sched, subj.Schedule(i.Key)); err != nil {
				return nil, err
			}
		}
		if st.NextRefresh.IsZero() {
			if st.NextRefresh, err = nextRefresh(ctx, work, subj.LegacySchedule(i.Key)); err != nil {
				return nil, err
			}
		}
		list = append(list, st)
	}
	return list, nil
}

// operatorError explains why an operator command cannot open a stream or
// bucket.
func operatorError(err error, subj events.Subjects) error {
	if errors.Is(err, jetstream.ErrBucketNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) {
		return fmt.Errorf("%w; no refresher has run with subject prefix %q on this NATS account; check --prefix and --nats-url", err, subj.Prefix())
	}
	return fmt.Errorf("%w; this operator command needs a NATS user with JetStream access to the authbus streams and buckets", err)
}

// nextRefresh returns when the pending schedule on subject fires, or the
// zero time when none is pending.
func nextRefresh(ctx context.Context, stream jetstream.Stream, subject string) (time.Time, error) {
	msg, err := stream.GetLastMsgForSubject(ctx, subject)
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

func printTable(s streams, list []credStatus, now time.Time) {
	if len(list) == 0 {
		return
	}
	w := tabwriter.NewWriter(s.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "KEY\tVERSION\tSTATE\tEXPIRES\tRECEIVED\tLEASE\tNEXT REFRESH\tRETRY")
	var failing []credStatus
	for _, c := range list {
		state := c.State
		if c.Reason != "" {
			state += " (" + c.Reason + ")"
		} else if c.LastFailure != nil {
			state += " (failing)"
			failing = append(failing, c)
		}
		fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", c.Key, c.Version, state, expiresText(c, now), ago(c.ReceivedAt, now),
			leaseText(c), ago(c.NextRefresh, now), retryText(c, now))
	}
	w.Flush()
	// The causes are too long for a column: one line each below the table.
	for _, c := range failing {
		fmt.Fprintf(s.out, "%s: %s\n", c.Key, failureText(c.LastFailure, now))
	}
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
	lastFailure := "-"
	if c.LastFailure != nil {
		lastFailure = failureText(c.LastFailure, now)
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
		{"last failure", lastFailure},
		{"retry", retryText(c, now)},
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

// failureText describes a failed refresh: when, which attempt, the cause.
func failureText(f *kv.Failure, now time.Time) string {
	return fmt.Sprintf("attempt %d failed %s: %s", f.Attempt, ago(f.At, now), f.Cause)
}

// retryText says when the retry of a failed refresh is due and which
// attempt it is: "#4 in 8s", or "-" when none is pending. A retry whose
// time has passed is being made, or waits for a free refresher.
func retryText(c credStatus, now time.Time) string {
	if c.LastFailure == nil || c.LastFailure.RetryAt.IsZero() || c.State != string(kv.StateActive) {
		return "-" // a needs_reauth is not retried
	}
	if !c.LastFailure.RetryAt.After(now) {
		return fmt.Sprintf("#%d due", c.LastFailure.Attempt+1)
	}
	return fmt.Sprintf("#%d %s", c.LastFailure.Attempt+1, ago(c.LastFailure.RetryAt, now))
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
