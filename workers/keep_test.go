package workers_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
)

// pendingSchedules returns how many schedules are pending per credential
// key, and the fingerprint each last one carries.
func pendingSchedules(t *testing.T, b *fleet.Fleet) (count map[string]uint64, fingerprint map[string]string) {
	t.Helper()
	work, err := b.JS.Stream(t.Context(), b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	info, err := work.Info(t.Context(), jetstream.WithSubjectFilter(b.Subj.ScheduleWildcard()))
	if err != nil {
		t.Fatal(err)
	}
	count, fingerprint = map[string]uint64{}, map[string]string{}
	for subject, n := range info.State.Subjects {
		_, k, err := b.Subj.Parse(subject)
		if err != nil {
			t.Fatalf("schedule subject %q: %v", subject, err)
		}
		count[k.String()] = n
		msg, err := work.GetLastMsgForSubject(t.Context(), subject)
		if err != nil {
			t.Fatal(err)
		}
		ev, err := events.Decode(events.TypeExpiring, k, msg.Data)
		if err != nil {
			t.Fatalf("schedule of %s: %v", k, err)
		}
		fingerprint[k.String()] = ev.Fingerprint()
	}
	return count, fingerprint
}

// Issue 16, done-when 1: an outage of the token endpoint that outlasts
// MaxDeliver deliveries and many half-open intervals loses no schedule.
// Every credential is refreshed once the server is back; those whose token
// had not expired yet when it came back are refreshed before it expires,
// and during the outage each pool calls no more than its breaker allows:
// the calls that open it, then one probe per half-open interval.
func TestOutageLosesNoSchedule(t *testing.T) {
	t.Parallel()
	const (
		pools   = 2
		outage  = 12 * time.Second
		perKind = 40
	)
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600) // the catch-up's tokens are not part of the test
	var cfg workers.Config
	b.StartPools(t, pools, func(c *workers.Config) {
		c.MaxDeliver = 3 // the outage outlasts 3 deliveries many times over
		cfg = *c
	})
	// Lifetimes (the lead is half of each): doomed tokens are due and
	// expire during the outage; savable ones are due during it and expire
	// 8 s after it; later ones are due after it.
	kinds := []struct {
		name     string
		lifetime int64
	}{{"doomed", 8}, {"savable", 20}, {"later", 30}}
	type cred struct {
		key     events.Key
		kind    string
		expires time.Time
		rt      string // the refresh token registered
	}
	var creds []cred
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, k := range kinds {
		for i := range perKind {
			wg.Go(func() {
				key := fleet.MustKey(t, fmt.Sprintf("acme.%s%d.api", k.name, i))
				tok := b.AS.Issue(fleet.ClientID)
				reg, err := b.TryRegister(key, tok, func(r *events.RegisterRequest) { r.Token.ExpiresIn = k.lifetime })
				if err != nil {
					t.Errorf("register %s: %v", key, err)
					return
				}
				mu.Lock()
				creds = append(creds, cred{key, k.name, reg.ExpiresAt, tok.RefreshToken})
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	down := time.Now()
	b.AS.SetDown(true)
	fleet.Eventually(t, outage+5*time.Second, "the outage lasted", func() bool { return time.Since(down) >= outage })
	b.AS.SetDown(false)
	up := time.Now()
	duringOutage := b.AS.Calls()
	for _, c := range creds {
		if c.kind == "doomed" && c.expires.After(up) || c.kind == "savable" && (c.expires.Before(up.Add(5*time.Second))) {
			t.Fatalf("%s expires at %s, %v after the outage: the test's timeline does not hold on this machine",
				c.key, c.expires.Format(time.StampMilli), c.expires.Sub(up))
		}
	}

	fleet.Eventually(t, 40*time.Second, "every credential refreshed after the outage", func() bool {
		for _, c := range creds {
			if got, _, err := b.Store.Get(context.Background(), c.key); err != nil || got.Version < 2 {
				return false
			}
		}
		return true
	})
	b.Settled(t)

	// Refreshed: every token that could still be saved, before it expired.
	refreshed := map[string]time.Time{} // by refresh token presented
	answered := map[string]int{}
	for _, call := range b.AS.CallLog() {
		if call.Status == http.StatusOK {
			answered[call.RefreshToken]++
			if _, ok := refreshed[call.RefreshToken]; !ok {
				refreshed[call.RefreshToken] = call.At
			}
		}
	}
	var late []string
	for _, c := range creds {
		if c.kind == "doomed" {
			continue
		}
		at, ok := refreshed[c.rt]
		if !ok || !at.Before(c.expires) {
			late = append(late, fmt.Sprintf("%s (%s, expired %s, refreshed %s)", c.key, c.kind, c.expires.Format(time.StampMilli), at.Format(time.StampMilli)))
		}
	}
	if len(late) > 0 {
		t.Errorf("%d credentials whose token had not expired when the server came back were refreshed too late: %s", len(late), strings.Join(late, "; "))
	}
	for rt, n := range answered {
		if n != 1 {
			t.Errorf("refresh token %s… redeemed %d times", rt[:8], n)
		}
	}
	if len(answered) != len(creds) {
		t.Errorf("answered refreshes = %d, want %d (one per credential)", len(answered), len(creds))
	}
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", got)
	}

	// Calls during the outage: those that open each pool's breaker (at
	// most BreakerFailures in a row, plus what its other workers had in
	// flight), then one probe per half-open interval.
	intervals := int(outage/cfg.BreakerOpenFor) + 1
	bound := pools * (int(cfg.BreakerFailures) + cfg.Workers - 1 + intervals)
	t.Logf("token-endpoint calls during the %v outage: %d (bound %d: %d pools × (%d to open + %d in flight + %d half-open intervals))",
		outage, duringOutage, bound, pools, cfg.BreakerFailures, cfg.Workers-1, intervals)
	if duringOutage > bound {
		t.Errorf("token-endpoint calls during the outage = %d, want at most %d", duringOutage, bound)
	}
	if duringOutage == 0 {
		t.Error("no token-endpoint call during the outage: the test's outage did not meet a refresh")
	}

	// Lost schedules: every credential has exactly one pending proactive
	// refresh, for its current token.
	count, fps := pendingSchedules(t, b)
	for _, c := range creds {
		if n := count[c.key.String()]; n != 1 {
			t.Errorf("%s has %d pending schedules, want 1", c.key, n)
		} else if cur := b.Cred(t, c.key); fps[c.key.String()] != cur.Fingerprint {
			t.Errorf("%s: the pending schedule is for fingerprint %s, the current token is %s", c.key, fps[c.key.String()], cur.Fingerprint)
		}
	}
	parked := len(b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "parked"}))
	released := b.Logs.Records(map[string]string{"msg": "token endpoint answers again: parked proactive refreshes released, earliest expiry first"})
	t.Logf("parked %d times; %d releases", parked, len(released))
	if parked == 0 {
		t.Error("no event was parked behind the open breaker")
	}
}

// A refresh that fails until MaxDeliver (a server that answers 503 too
// rarely in a row to open the breaker) schedules its next attempt before it
// is terminated, and that attempt refreshes the credential.
func TestGiveUpSchedulesNextAttempt(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600)
	b.StartPools(t, 1, func(c *workers.Config) {
		c.MaxDeliver = 2
		c.BreakerFailures = 1000
	})
	key := fleet.MustKey(t, "acme.giveup.api")
	b.AS.Fail(2, http.StatusServiceUnavailable, `{"error":"temporarily_unavailable"}`, nil)
	w := b.Watch(t, key)
	b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 4 })
	w.WaitFor(t, "the refresh after the give-up", fleet.RotatedVersion(2))
	gaveUp := b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "transient", "attempt": "2"})
	if len(gaveUp) != 1 || !strings.Contains(fmt.Sprint(gaveUp[0]["detail"]), "next attempt scheduled for") {
		t.Errorf("want one give-up that scheduled the next attempt, got %v", gaveUp)
	}
	b.Settled(t)
	if got := b.AS.Calls(); got != 3 {
		t.Errorf("token-endpoint calls = %d, want 3 (two 503s, then the rescheduled attempt)", got)
	}
}

// A schedule that fires for a token the credential no longer holds (a
// write that raced a rotation, or the reconciler's) is answered as stale
// and leaves the schedule of the current token behind.
func TestStaleScheduleRestoresCurrent(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) { c.ReconcileEvery = -1 })
	key := fleet.MustKey(t, "acme.raced.api")
	old := b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	cur := b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })

	// The late write: the old token's schedule, replacing the current one.
	data, err := events.Encode(key, "test/race", events.Expiring{Fingerprint: old.Fingerprint, ExpiresAt: old.ExpiresAt})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.JS.Publish(t.Context(), b.Subj.Schedule(key), data,
		jetstream.WithScheduleAt(time.Now().Add(time.Second)), jetstream.WithScheduleTarget(b.Subj.Due(events.TypeExpiring, key))); err != nil {
		t.Fatal(err)
	}
	fleet.Eventually(t, 10*time.Second, "the late schedule fired and was answered as stale", func() bool {
		return len(b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "stale"})) == 1
	})
	b.Settled(t)
	count, fps := pendingSchedules(t, b)
	if count[key.String()] != 1 || fps[key.String()] != cur.Fingerprint {
		t.Errorf("pending schedules %d for %q, want 1 for the current token %q", count[key.String()], fps[key.String()], cur.Fingerprint)
	}
	if got := b.AS.Calls(); got != 0 {
		t.Errorf("token-endpoint calls = %d, want 0", got)
	}
}

// The reconciler restores the schedule of every active credential with an
// expiry that lost it, and only those: not of a credential that needs
// re-auth, not of a token without expiry, not twice.
func TestReconcileRestoresMissingSchedules(t *testing.T) {
	t.Parallel()
	const creds, lost = 30, 12
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) { c.ReconcileEvery = -1 })
	pool := b.Pools[0].Pool
	var keys []events.Key
	for i := range creds {
		keys = append(keys, fleet.MustKey(t, fmt.Sprintf("acme.rec%d.api", i)))
		b.Register(t, keys[i], b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	}
	forever := fleet.MustKey(t, "acme.forever.api")
	b.Register(t, forever, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 0 })
	reauth := fleet.MustKey(t, "acme.reauth.api")
	rw := b.Watch(t, reauth)
	tok := b.AS.Issue(fleet.ClientID)
	tok.RefreshToken = ""
	reg := b.Register(t, reauth, tok, func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	b.Publish401(t, reauth, reg.Fingerprint, "rt", true)
	rw.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	b.Settled(t)

	work, err := b.JS.Stream(t.Context(), b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range append(keys[:lost:lost], reauth) {
		if err := work.Purge(t.Context(), jetstream.WithPurgeSubject(b.Subj.Schedule(k))); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := pool.Reconcile(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first pass: %+v", rep)
	if want := (workers.ReconcileReport{Credentials: creds + 2, Covered: creds - lost, Checked: lost + 2, Restored: lost}); rep.Credentials != want.Credentials ||
		rep.Covered != want.Covered || rep.Checked != want.Checked || rep.Restored != want.Restored || rep.Failed != 0 {
		t.Errorf("first pass = %+v, want %+v", rep, want)
	}
	count, fps := pendingSchedules(t, b)
	for _, k := range keys {
		if count[k.String()] != 1 || fps[k.String()] != b.Cred(t, k).Fingerprint {
			t.Errorf("%s: %d pending schedules, want 1 for its token", k, count[k.String()])
		}
	}
	for _, k := range []events.Key{forever, reauth} {
		if count[k.String()] != 0 {
			t.Errorf("%s: %d pending schedules, want none", k, count[k.String()])
		}
	}
	rep, err = pool.Reconcile(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if rep.Restored != 0 || rep.Checked != 0 || rep.Quiet != 2 {
		t.Errorf("second pass = %+v, want nothing restored or read, the 2 that need no schedule remembered", rep)
	}
	// Written since: read again.
	b.Register(t, forever, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 0 })
	if rep, err = pool.Reconcile(t.Context()); err != nil {
		t.Fatal(err)
	}
	if rep.Restored != 0 || rep.Checked != 1 || rep.Quiet != 1 {
		t.Errorf("third pass = %+v, want the re-registered credential read again", rep)
	}
}

// A pool that starts reconciles on its own: a schedule lost while no
// refresher ran is back shortly after one starts.
func TestReconcileAtStart(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) { c.ReconcileEvery = -1 })
	key := fleet.MustKey(t, "acme.restart.api")
	b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	b.StopPools(t)
	work, err := b.JS.Stream(t.Context(), b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	if err := work.Purge(t.Context(), jetstream.WithPurgeSubject(b.Subj.Schedule(key))); err != nil {
		t.Fatal(err)
	}
	b.StartPools(t, 1, func(c *workers.Config) { c.ReconcileEvery = time.Hour })
	fleet.Eventually(t, 20*time.Second, "the schedule restored by the pass at start", func() bool {
		count, _ := pendingSchedules(t, b)
		return count[key.String()] == 1
	})
}

// When a breaker closes, the credentials parked behind it fire at once in
// the order that saves the most tokens: those that have not expired yet,
// the earliest expiry first, then the expired ones.
func TestReleaseEarliestExpiryFirst(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) { c.ReconcileEvery = -1 })
	// The fired events stay in the stream, in the order they fired.
	if _, err := b.JS.PauseConsumer(t.Context(), b.Subj.SchedulesStream(), "refreshers-due", time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	offsets := []time.Duration{40, -5, 10, -30, 25, 5, -1, 60, 15, -15} // seconds from now
	var creds []*kv.Credential
	for i, off := range offsets {
		creds = append(creds, &kv.Credential{
			Key:         fleet.MustKey(t, fmt.Sprintf("acme.parked%d.api", i)),
			Fingerprint: fmt.Sprintf("%016x", i),
			ReceivedAt:  now.Add(-time.Hour),
			ExpiresAt:   now.Add(off * time.Second),
		})
	}
	b.Pools[0].Pool.Release(t.Context(), creds)

	work, err := b.JS.Stream(t.Context(), b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	fleet.Eventually(t, 10*time.Second, "every released schedule fired", func() bool {
		info, err := work.Info(t.Context(), jetstream.WithSubjectFilter(b.Subj.DueWildcard(events.TypeExpiring)))
		return err == nil && len(info.State.Subjects) == len(creds)
	})
	info, err := work.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var fired []string
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		msg, err := work.GetMsg(t.Context(), seq)
		if err != nil {
			continue // a replaced schedule, or a gap
		}
		if typ, k, err := b.Subj.ParseWork(msg.Subject); err == nil && typ == events.TypeExpiring {
			fired = append(fired, k.User)
		}
	}
	want := "parked5 parked2 parked8 parked4 parked0 parked7 parked3 parked9 parked1 parked6"
	if got := strings.Join(fired, " "); got != want {
		t.Errorf("fired in the order %s, want %s (unexpired by expiry, then expired by expiry)", got, want)
	}
}

// In a storm of 401s only the first rotation writes a schedule: the ones
// after it keep the pending one, which fires before their tokens' windows
// close (and, firing for a token the credential no longer holds, writes
// the current one: TestStaleScheduleRestoresCurrent). A token
// shorter-lived than the schedule allows gets a schedule of its own.
func TestRotationKeepsAPendingScheduleThatFiresInTime(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600)
	b.StartPools(t, 1, func(c *workers.Config) { c.ReconcileEvery = -1 })
	key := fleet.MustKey(t, "acme.lazy.api")
	reg := b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	sched, err := b.JS.Stream(t.Context(), b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	w := b.Watch(t, key)
	// pending returns the schedule pending for key, its fire time and the
	// fingerprint it carries, once the schedule of version v's rotation
	// settled.
	pending := func(v int64) (seq uint64, at time.Time, fp string) {
		t.Helper()
		b.Settled(t)
		msg, err := sched.GetLastMsgForSubject(t.Context(), b.Subj.Schedule(key))
		if err != nil {
			t.Fatalf("version %d: the pending schedule: %v", v, err)
		}
		ev, err := events.Decode(events.TypeExpiring, key, msg.Data)
		if err != nil {
			t.Fatal(err)
		}
		if at, err = time.Parse(time.RFC3339, msg.Header.Get("Authbus-Scheduled-For")); err != nil {
			t.Fatal(err)
		}
		return msg.Sequence, at, ev.Fingerprint()
	}
	rotate := func(v int64, fp string) *kv.Credential {
		t.Helper()
		b.Publish401(t, key, fp, "runtime-1", true)
		w.WaitFor(t, fmt.Sprintf("rotation to version %d", v), fleet.RotatedVersion(v))
		return b.Cred(t, key)
	}

	v2 := rotate(2, reg.Fingerprint)
	seq2, at2, fp2 := pending(2)
	if fp2 != v2.Fingerprint || !v2.ScheduledFor.Equal(at2) {
		t.Fatalf("after the first rotation: schedule for %q at %v, record says %v; want one for version 2 %q at the time the record states", fp2, at2, v2.ScheduledFor, v2.Fingerprint)
	}
	for v := int64(3); v <= 5; v++ {
		c := rotate(v, b.Cred(t, key).Fingerprint)
		seq, at, fp := pending(v)
		if seq != seq2 || fp != fp2 || !c.ScheduledFor.Equal(at2) {
			t.Errorf("version %d: pending schedule #%d for %q at %v, record says %v; want version 2's #%d at %v kept", v, seq, fp, at, c.ScheduledFor, seq2, at2)
		}
		if latest := c.ExpiresAt.Add(-3 * time.Minute); at.After(latest) { // half the lead of a 1-hour token
			t.Errorf("version %d: the kept schedule fires at %v, after the token's window closes (%v)", v, at, latest)
		}
	}

	// Five minutes: version 2's schedule, about an hour out, would fire
	// after this token expired.
	b.AS.SetExpiresIn(300)
	v6 := rotate(6, b.Cred(t, key).Fingerprint)
	seq6, at6, fp6 := pending(6)
	if seq6 == seq2 || fp6 != v6.Fingerprint || !v6.ScheduledFor.Equal(at6) || !at6.Before(v6.ExpiresAt) {
		t.Errorf("short-lived version 6 (expires %v): pending schedule #%d for %q at %v, record says %v; want a new one for %q before expiry",
			v6.ExpiresAt, seq6, fp6, at6, v6.ScheduledFor, v6.Fingerprint)
	}
	if calls, reuses := b.AS.Calls(), b.AS.Reuses(); calls != 5 || reuses != 0 {
		t.Errorf("token-endpoint calls %d, reuses %d; want 5 and 0", calls, reuses)
	}
}
