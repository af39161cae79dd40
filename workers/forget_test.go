package workers_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// Forget removes the record, the pending schedule and the kept needs_reauth
// of one credential, and nothing of another; a second Forget finds nothing.
func TestForgetRemovesRecordScheduleAndKeptReauth(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	ctx := context.Background()
	gone := fleet.MustKey(t, "acme.gone.github")
	kept := fleet.MustKey(t, "acme.kept.github")

	// gone: a needs_reauth (kept in its stream) and, from its registration,
	// a pending proactive refresh.
	tok := b.AS.Issue(fleet.ClientID)
	reg := b.Register(t, gone, tok, nil)
	b.AS.Revoke(tok.RefreshToken)
	w := b.Watch(t, gone)
	b.Publish401(t, gone, reg.Fingerprint, "rt", true)
	w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	b.Register(t, kept, b.AS.Issue(fleet.ClientID), nil)

	work, err := b.JS.Stream(ctx, b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	reauth, err := b.JS.Stream(ctx, b.Subj.ReauthStream())
	if err != nil {
		t.Fatal(err)
	}
	has := func(s jetstream.Stream, subject string) bool {
		_, err := s.GetLastMsgForSubject(ctx, subject)
		if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			t.Fatalf("read %s: %v", subject, err)
		}
		return err == nil
	}
	// Subscribers may see the event before the stream has stored it.
	fleet.Eventually(t, 5*time.Second, "needs_reauth kept", func() bool {
		return has(reauth, b.Subj.Event(events.TypeNeedsReauth, gone))
	})
	if !has(work, b.Subj.Schedule(gone)) || !has(work, b.Subj.Schedule(kept)) {
		t.Fatal("registration left no pending schedule; the test cannot show that Forget removes it")
	}

	f, err := workers.Forget(ctx, b.JS, b.Subj, gone)
	if err != nil {
		t.Fatalf("Forget: %v", err)
	}
	if f != (workers.Forgotten{Registered: true, Scheduled: true, NeedsReauth: true}) {
		t.Errorf("Forget reported %+v, want all three found", f)
	}
	if code, body := b.Request(t, b.Subj.Token(gone), nil); code != "404" {
		t.Errorf("token of a forgotten credential: code %q body %s, want 404", code, body)
	}
	if has(work, b.Subj.Schedule(gone)) || has(reauth, b.Subj.Event(events.TypeNeedsReauth, gone)) {
		t.Error("the schedule or the kept needs_reauth survived Forget")
	}
	if !has(work, b.Subj.Schedule(kept)) {
		t.Error("Forget removed another credential's schedule")
	}
	if code, body := b.Request(t, b.Subj.Token(kept), nil); code != "" {
		t.Errorf("token of the other credential: code %q body %s", code, body)
	}

	f, err = workers.Forget(ctx, b.JS, b.Subj, gone)
	if err != nil || f.Any() {
		t.Errorf("second Forget: %+v, %v; want nothing found and no error", f, err)
	}

	// A forgotten key can be registered again from scratch.
	if r := b.Register(t, gone, b.AS.Issue(fleet.ClientID), nil); r.Version != 1 {
		t.Errorf("re-registered forgotten credential has version %d, want 1", r.Version)
	}
}

func TestForgetWithoutDeploymentSaysWhatToDo(t *testing.T) {
	b := fleet.Setup(t) // no pool: nothing provisioned
	_, err := workers.Forget(context.Background(), b.JS, b.Subj, fleet.MustKey(t, "acme.x.github"))
	if !errors.Is(err, workers.ErrNotProvisioned) {
		t.Fatalf("Forget on an empty server: %v, want ErrNotProvisioned", err)
	}
	t.Log(err)
}
