package workers

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
)

// ErrNotProvisioned is wrapped by Forget's error when a stream or bucket of
// the deployment does not exist: no refresher has started with this subject
// prefix on this NATS account.
var ErrNotProvisioned = errors.New("authbus streams and buckets not found")

// Forgotten says what Forget found and removed.
type Forgotten struct {
	// Registered: a credential record existed and was purged.
	Registered bool
	// Scheduled: a pending proactive refresh existed and was purged.
	Scheduled bool
	// NeedsReauth: a kept auth.needs_reauth existed and was purged.
	NeedsReauth bool
}

// Any reports whether Forget found anything of the credential.
func (f Forgotten) Any() bool { return f.Registered || f.Scheduled || f.NeedsReauth }

// Forget removes what authbus keeps of credential k in the deployment of
// subj: its record in the credential bucket (purged with its history, which
// holds sealed older refresh tokens), its pending proactive refresh
// (<prefix>.proactive.<key> in the schedules stream, and the
// <prefix>.schedule.<key> an earlier version kept in the events stream) and its kept
// auth.needs_reauth. It is idempotent: forgetting an unknown key removes
// nothing and is not an error.
//
// Forget needs JetStream access to the deployment's streams and buckets (an
// operator's NATS user, not a tenant's), but no seal key and no running
// refresher. It does not touch the authorization server: the tokens stay
// valid there until they expire or are revoked at the server.
//
// A refresh in flight when Forget runs loses its compare-and-set and is
// discarded; events for k still queued are terminated by the workers as
// unknown_credential. The record goes first, so the token service answers
// not_found as soon as Forget has begun, and the schedule after it, so a
// refresh that stored just before the purge cannot leave a schedule behind
// it in all but a narrow window (a leftover schedule fires once and is
// terminated as unknown_credential). Forget is safe for concurrent use.
func Forget(ctx context.Context, js jetstream.JetStream, subj events.Subjects, k events.Key) (Forgotten, error) {
	var f Forgotten
	if err := k.Validate(); err != nil {
		return f, err
	}
	bucketName := subj.CredentialsBucket()
	bucket, err := js.KeyValue(ctx, bucketName)
	if err != nil {
		return f, notProvisioned("credential bucket "+bucketName, subj, err)
	}
	switch _, err := bucket.Get(ctx, k.String()); {
	case errors.Is(err, jetstream.ErrKeyNotFound):
	case err != nil:
		return f, fmt.Errorf("forget %s: read credential: %w", k, err)
	default:
		f.Registered = true
		// Purge, not Delete: the history holds older sealed refresh tokens.
		if err := bucket.Purge(ctx, k.String()); err != nil {
			return f, fmt.Errorf("forget %s: purge credential: %w", k, err)
		}
	}
	var legacy bool
	for _, target := range []struct {
		stream, subject string
		found           *bool
	}{
		{subj.SchedulesStream(), subj.Schedule(k), &f.Scheduled},
		{subj.EventsStream(), subj.LegacySchedule(k), &legacy},
		{subj.ReauthStream(), subj.Event(events.TypeNeedsReauth, k), &f.NeedsReauth},
	} {
		found, err := purgeSubject(ctx, js, subj, target.stream, target.subject)
		if err != nil {
			return f, fmt.Errorf("forget %s: %w", k, err)
		}
		*target.found = found
	}
	f.Scheduled = f.Scheduled || legacy
	return f, nil
}

// purgeSubject purges subject from stream and reports whether it held a
// message. Both streams keep at most one message per key subject (a newer
// schedule replaces the older one; the reauth stream keeps one per
// subject), so looking at the last one is enough.
func purgeSubject(ctx context.Context, js jetstream.JetStream, subj events.Subjects, name, subject string) (bool, error) {
	stream, err := js.Stream(ctx, name)
	if err != nil {
		return false, notProvisioned("stream "+name, subj, err)
	}
	switch _, err := stream.GetLastMsgForSubject(ctx, subject); {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("read %s in stream %s: %w", subject, name, err)
	}
	if err := stream.Purge(ctx, jetstream.WithPurgeSubject(subject)); err != nil {
		return false, fmt.Errorf("purge %s from stream %s: %w", subject, name, err)
	}
	return true, nil
}

func notProvisioned(what string, subj events.Subjects, err error) error {
	if errors.Is(err, jetstream.ErrBucketNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) {
		return fmt.Errorf("%s: %w; start a refresher with subject prefix %q on this NATS account first, or fix the prefix (%w)",
			what, err, subj.Prefix(), ErrNotProvisioned)
	}
	return fmt.Errorf("open %s: %w; forgetting a credential needs JetStream access to the authbus streams and buckets (an operator's NATS user)", what, err)
}
