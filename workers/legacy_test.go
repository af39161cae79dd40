package workers_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// writeLegacySchedule writes key's schedule as a refresher of an earlier
// version did: in the events stream, firing on the work lane at at. It
// replaces the schedule of this version, so that the old one is all the
// credential has.
func writeLegacySchedule(t *testing.T, b *fleet.Fleet, key events.Key, fingerprint string, at time.Time) {
	t.Helper()
	sched, err := b.JS.Stream(t.Context(), b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	if err := sched.Purge(t.Context(), jetstream.WithPurgeSubject(b.Subj.Schedule(key))); err != nil {
		t.Fatal(err)
	}
	data, err := events.Encode(key, "test/earlier-version", events.Expiring{Fingerprint: fingerprint, ExpiresAt: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.JS.Publish(t.Context(), b.Subj.LegacySchedule(key), data,
		jetstream.WithScheduleAt(at), jetstream.WithScheduleTarget(b.Subj.Work(events.TypeExpiring, key))); err != nil {
		t.Fatal(err)
	}
}

// legacySchedules returns how many schedules of an earlier version the
// events stream holds for key.
func legacySchedules(t *testing.T, b *fleet.Fleet, key events.Key) uint64 {
	t.Helper()
	work, err := b.JS.Stream(t.Context(), b.Subj.EventsStream())
	if err != nil {
		t.Fatal(err)
	}
	info, err := work.Info(t.Context(), jetstream.WithSubjectFilter(b.Subj.LegacySchedule(key)))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[b.Subj.LegacySchedule(key)]
}

// Upgrading from a version that kept the schedules in the events stream: the
// reconciler counts such a schedule as present and writes no second one,
// and the credential's next refresh writes its schedule in the schedules
// stream and removes the old one, so that it ends with exactly one.
func TestLegacyScheduleCountedThenReplaced(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600)
	b.StartPools(t, 1, func(c *workers.Config) { c.ReconcileEvery = -1 })
	pool := b.Pools[0].Pool
	key := fleet.MustKey(t, "acme.upgraded.api")
	other := fleet.MustKey(t, "acme.current.api")
	w := b.Watch(t, key)
	reg := b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	b.Register(t, other, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	writeLegacySchedule(t, b, key, reg.Fingerprint, time.Now().Add(time.Hour))

	rep, err := pool.Reconcile(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if rep.Credentials != 2 || rep.Covered != 2 || rep.Restored != 0 || rep.Checked != 0 {
		t.Errorf("reconcile = %+v, want both credentials covered, one by its old schedule, and nothing restored", rep)
	}
	if count, _ := pendingSchedules(t, b); count[key.String()] != 0 || legacySchedules(t, b, key) != 1 {
		t.Fatalf("before the refresh: %d schedules in %s and %d in %s, want 0 and 1",
			count[key.String()], b.Subj.SchedulesStream(), legacySchedules(t, b, key), b.Subj.EventsStream())
	}

	b.Publish401(t, key, reg.Fingerprint, "rt", true)
	w.WaitFor(t, "the rotation", fleet.RotatedVersion(2))
	b.Settled(t)
	fleet.Eventually(t, 10*time.Second, "the old schedule removed and the new one written", func() bool {
		count, fps := pendingSchedules(t, b)
		return count[key.String()] == 1 && fps[key.String()] == b.Cred(t, key).Fingerprint && legacySchedules(t, b, key) == 0
	})
	if count, _ := pendingSchedules(t, b); count[other.String()] != 1 {
		t.Errorf("the other credential has %d schedules, want its 1 untouched", count[other.String()])
	}
}

// An old schedule still fires on the work lane, which this version
// consumes: it is answered (here: not due yet) and the credential's
// schedule is written in the schedules stream.
func TestLegacyScheduleFiresOnWorkLane(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) { c.ReconcileEvery = -1 })
	key := fleet.MustKey(t, "acme.oldfire.api")
	reg := b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	writeLegacySchedule(t, b, key, reg.Fingerprint, time.Now().Add(time.Second))

	fleet.Eventually(t, 10*time.Second, "the old schedule fired and was answered on the work lane", func() bool {
		return len(b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "not_due", "subject": b.Subj.Work(events.TypeExpiring, key)})) == 1
	})
	b.Settled(t)
	count, fps := pendingSchedules(t, b)
	if count[key.String()] != 1 || fps[key.String()] != reg.Fingerprint || legacySchedules(t, b, key) != 0 {
		t.Errorf("after the old schedule fired: %d schedules (fingerprint %q) in %s and %d in %s, want 1 for %q and 0",
			count[key.String()], fps[key.String()], b.Subj.SchedulesStream(), legacySchedules(t, b, key), b.Subj.EventsStream(), reg.Fingerprint)
	}
	if got := b.AS.Calls(); got != 0 {
		t.Errorf("token-endpoint calls = %d, want 0", got)
	}
}

// On one replica the schedules stream is not synced on every write (the
// reconciler restores what a crash loses); the events stream is.
func TestSchedulesStreamPersistMode(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) { c.ReconcileEvery = -1 })
	for name, want := range map[string]jetstream.PersistModeType{
		b.Subj.SchedulesStream(): jetstream.AsyncPersistMode,
		b.Subj.EventsStream():    jetstream.DefaultPersistMode,
	} {
		s, err := b.JS.Stream(t.Context(), name)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.CachedInfo().Config.PersistMode; got != want {
			t.Errorf("stream %s persist mode %v, want %v", name, got, want)
		}
	}
}
