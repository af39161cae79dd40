package workers_test

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// The proactive-refresh tests wait for real schedules to fire (whole
// seconds on the server's clock), so they run in parallel with each other.

// Issue 5, done-when 1: a 10 s token is refreshed before it expires, five
// generations in a row, with no 401 from anyone and one call each.
func TestProactiveRefreshFiveGenerations(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(10)
	b.StartPools(t, 2, nil)
	key := fleet.MustKey(t, "acme.steady.github")
	w := b.Watch(t, key)
	reg := b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 10 })

	expiry := map[int64]time.Time{1: reg.ExpiresAt}
	for v := int64(2); v <= 6; v++ {
		ev := w.WaitFor(t, fmt.Sprintf("proactive rotation to version %d", v), fleet.RotatedVersion(v))
		expiry[v] = ev.Rotated.ExpiresAt
	}
	calls := b.AS.CallLog()
	if len(calls) < 5 {
		t.Fatalf("token-endpoint calls = %d, want 5", len(calls))
	}
	for i, c := range calls[:5] {
		gen := int64(i + 1)
		if !c.At.Before(expiry[gen]) {
			t.Errorf("generation %d refreshed at %s, after it expired at %s", gen, c.At.Format(time.StampMilli), expiry[gen].Format(time.StampMilli))
		}
		if c.Error != "" || c.Reuse {
			t.Errorf("call %d: error %q reuse %v, want a clean refresh", i, c.Error, c.Reuse)
		}
	}
	// Each generation is exactly one call: version 7 may be on its way, but
	// never two calls for one generation.
	if got := len(b.AS.CallLog()); got > 6 {
		t.Errorf("token-endpoint calls = %d for 5 generations", got)
	}
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", got)
	}
	// The outcome is logged after the ack, just after the announcement.
	fleet.Eventually(t, 5*time.Second, "five rotated outcomes logged", func() bool {
		return len(b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "rotated"})) >= 5
	})
	if strings.Contains(b.Logs.String(), "auth.401.") {
		t.Error("a 401 event was processed; the proactive refresh should have prevented every one")
	}
}

// Issue 5, done-when 2: credentials registered in the same second are all
// refreshed before they expire, one call each, and the jitter spreads the
// calls over the first half of the lead instead of one second. The race
// suite runs a wave small enough to keep up on a busy two-core CI machine;
// BenchmarkExpiryWave runs the 2 000-credential wave and reports the
// figures (refreshing before expiry is a throughput target, measured there).
func TestProactiveRefreshWaveIsSpread(t *testing.T) {
	t.Parallel()
	const creds, lifetime = 400, 20
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600) // the next generation is not part of this wave
	b.StartPools(t, 3, nil)

	expiresAt := make(map[string]time.Time, creds) // by refresh token
	var mu sync.Mutex
	var wg sync.WaitGroup
	work := make(chan int)
	start := time.Now()
	for range 32 {
		wg.Go(func() {
			for i := range work {
				tok := b.AS.Issue(fleet.ClientID)
				reg, err := b.TryRegister(fleet.MustKey(t, fmt.Sprintf("acme.wave%d.github", i)), tok,
					func(r *events.RegisterRequest) { r.Token.ExpiresIn = lifetime })
				if err != nil {
					t.Errorf("register %d: %v", i, err)
					continue
				}
				mu.Lock()
				expiresAt[tok.RefreshToken] = reg.ExpiresAt
				mu.Unlock()
			}
		})
	}
	for i := range creds {
		work <- i
	}
	close(work)
	wg.Wait()
	t.Logf("registered %d credentials in %v", creds, time.Since(start).Round(time.Millisecond))

	if err := b.AS.WaitCalls(t.Context(), creds); err != nil {
		t.Fatalf("waiting for %d refreshes: %v (saw %d)", creds, err, b.AS.Calls())
	}
	b.Settled(t)
	if got := b.AS.Calls(); got != creds {
		t.Errorf("token-endpoint calls = %d, want %d", got, creds)
	}
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", got)
	}
	perSecond := map[int]int{}
	late := 0
	for _, c := range b.AS.CallLog() {
		if exp, ok := expiresAt[c.RefreshToken]; !ok || !c.At.Before(exp) {
			late++
		}
		perSecond[int(c.At.Sub(start)/time.Second)]++
	}
	if late != 0 {
		t.Errorf("%d credentials were refreshed after they expired", late)
	}
	secs := make([]int, 0, len(perSecond))
	busiest := 0
	for s, n := range perSecond {
		secs = append(secs, s)
		busiest = max(busiest, n)
	}
	sort.Ints(secs)
	var hist strings.Builder
	for _, s := range secs {
		fmt.Fprintf(&hist, "\n  +%2ds %5d %s", s, perSecond[s], strings.Repeat("#", perSecond[s]/20))
	}
	t.Logf("token-endpoint calls by second after the first registration (lifetime %ds):%s", lifetime, hist.String())
	// Without jitter every schedule of a one-second wave fires in the same
	// one or two seconds.
	if busiest > creds/2 {
		t.Errorf("%d of %d calls fell in one second; the schedules are not spread", busiest, creds)
	}
}

// Issue 5, done-when 3: with every refresher stopped past the refresh
// margin, the schedules fire into the stream and wait; the refreshers that
// start later refresh each credential once, at once.
func TestProactiveRefreshSurvivesRefresherOutage(t *testing.T) {
	t.Parallel()
	const creds = 100
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600)
	b.StartPools(t, 2, nil)
	var last time.Time
	keys := make([]events.Key, creds)
	for i := range creds {
		keys[i] = fleet.MustKey(t, fmt.Sprintf("acme.outage%d.github", i))
		reg := b.Register(t, keys[i], b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 4 })
		if reg.ExpiresAt.After(last) {
			last = reg.ExpiresAt
		}
	}
	b.StopPools(t)

	cons, err := b.JS.Consumer(t.Context(), b.Subj.SchedulesStream(), "refreshers-due")
	if err != nil {
		t.Fatal(err)
	}
	fleet.Eventually(t, 20*time.Second, "every schedule fired and every token expired with no refresher running", func() bool {
		ci, err := cons.Info(t.Context())
		return err == nil && ci.NumPending == creds && time.Now().After(last.Add(time.Second))
	})
	if got := b.AS.Calls(); got != 0 {
		t.Fatalf("token-endpoint calls while no refresher ran = %d", got)
	}

	restart := time.Now()
	b.StartPools(t, 2, nil)
	fleet.Eventually(t, 20*time.Second, "every credential refreshed after the restart", func() bool {
		for _, k := range keys {
			if c, _, err := b.Store.Get(context.Background(), k); err != nil || c.Version != 2 {
				return false
			}
		}
		return true
	})
	t.Logf("%d overdue credentials refreshed %v after the refreshers started", creds, time.Since(restart).Round(time.Millisecond))
	b.Settled(t)
	if got := b.AS.Calls(); got != creds {
		t.Errorf("token-endpoint calls = %d, want %d (one per credential)", got, creds)
	}
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", got)
	}
}

// Issue 5, done-when 4: a 401 storm that arrives while the scheduled
// refresh is calling the token endpoint costs no second call.
func TestStormDuringScheduledRefresh(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600)
	b.StartPools(t, 3, nil)
	key := fleet.MustKey(t, "acme.clash.github")
	tok := b.AS.Issue(fleet.ClientID)
	fp := events.Fingerprint(tok.AccessToken)

	var stormed atomic.Bool
	stormErr := make(chan error, 1)
	b.AS.OnToken(func(*http.Request) {
		if !stormed.CompareAndSwap(false, true) {
			return
		}
		// The scheduled auth.expiring is being served right now: the
		// runtimes' 401s arrive in the same moment, half without the
		// Nats-Msg-Id that would let the stream drop them.
		stormErr <- publishStorm(b, key, fp, 50)
	})
	w := b.Watch(t, key)
	b.Register(t, key, tok, func(r *events.RegisterRequest) { r.Token.ExpiresIn = 4 })
	w.WaitFor(t, "rotation", fleet.RotatedVersion(2))
	if err := <-stormErr; err != nil {
		t.Fatalf("storm: %v", err)
	}
	b.Settled(t)
	if got := b.AS.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", got)
	}
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", got)
	}
	if n := w.Count(fleet.RotatedVersion(3)); n != 0 {
		t.Errorf("saw version 3: the storm caused a second rotation")
	}
	// The first call was the schedule's: no 401 had been published before.
	if n := len(b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "rotated", "subject": b.Subj.Due(events.TypeExpiring, key)})); n != 1 {
		t.Errorf("rotations by the scheduled auth.expiring = %d, want 1", n)
	}
}

// publishStorm publishes n 401s for fp as separate runtimes would, half of
// them without a Nats-Msg-Id. It reports errors instead of failing, so it
// can run on a server goroutine.
func publishStorm(b *fleet.Fleet, key events.Key, fp string, n int) error {
	for i := range n {
		data, err := events.Encode(key, "test/storm", events.Unauthorized{Fingerprint: fp, Runtime: fmt.Sprintf("runtime-%d", i), Status: 401})
		if err != nil {
			return err
		}
		// Half as runtimes report (through the intake, with Nats-Msg-Id),
		// half straight into the work queue: reports the de-duplication
		// does not catch.
		subject, opts := b.Subj.Work(events.Type401, key), []jetstream.PublishOpt{}
		if i%2 == 0 {
			subject = b.Subj.Event(events.Type401, key)
			opts = append(opts, jetstream.WithMsgID(events.MsgID(events.Type401, key, fp)))
		}
		if _, err := b.JS.Publish(context.Background(), subject, data, opts...); err != nil {
			return err
		}
	}
	return nil
}

// Issue 5, done-when 5: re-registering replaces the pending schedule, so the
// old token is never refreshed; registering a token without expiry removes
// it.
func TestReRegistrationReplacesSchedule(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.again.github")
	first := b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 4 })
	work, err := b.JS.Stream(t.Context(), b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	schedule := func() (at string, n uint64) {
		info, err := work.Info(t.Context(), jetstream.WithSubjectFilter(b.Subj.Schedule(key)))
		if err != nil {
			t.Fatal(err)
		}
		if n = info.State.Subjects[b.Subj.Schedule(key)]; n == 0 {
			return "", 0
		}
		msg, err := work.GetLastMsgForSubject(t.Context(), b.Subj.Schedule(key))
		if err != nil {
			t.Fatal(err)
		}
		return msg.Header.Get(jetstream.ScheduleHeader), n
	}
	at1, n := schedule()
	if n != 1 || at1 == "" {
		t.Fatalf("after the first registration: %d schedules (%q), want 1", n, at1)
	}

	b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	at2, n := schedule()
	if n != 1 || at2 == at1 {
		t.Fatalf("after re-registration: %d schedules at %q (first was %q), want 1 replaced", n, at2, at1)
	}
	// Wait past the moment the first schedule would have fired and the first
	// token expired.
	fleet.Eventually(t, 10*time.Second, "the first token's expiry passed", func() bool {
		return time.Now().After(first.ExpiresAt.Add(time.Second))
	})
	b.Settled(t)
	if got := b.AS.Calls(); got != 0 {
		t.Errorf("token-endpoint calls = %d, want 0: the replaced schedule refreshed", got)
	}
	if n := len(b.Logs.Records(map[string]string{"msg": "event processed", "subject": b.Subj.Due(events.TypeExpiring, key)})); n != 0 {
		t.Errorf("%d auth.expiring events processed, want 0", n)
	}

	b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 0 })
	if at, n := schedule(); n != 0 {
		t.Errorf("a token without expiry left a schedule at %q", at)
	}
}

// A token that arrives already expired is refreshed at once, with no 401; a
// token without expiry is never refreshed proactively.
func TestExpiredOnArrivalRefreshesAtOnce(t *testing.T) {
	t.Parallel()
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.stale.github")
	w := b.Watch(t, key)
	b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) {
		r.Token.ExpiresIn = 0
		r.Token.ExpiresAt = time.Now().Add(-time.Minute)
	})
	w.WaitFor(t, "the immediate refresh", fleet.RotatedVersion(2))

	forever := fleet.MustKey(t, "acme.forever.github")
	b.Register(t, forever, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 0 })
	work, err := b.JS.Stream(t.Context(), b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	info, err := work.Info(t.Context(), jetstream.WithSubjectFilter(b.Subj.Schedule(forever)))
	if err != nil {
		t.Fatal(err)
	}
	if n := info.State.Subjects[b.Subj.Schedule(forever)]; n != 0 {
		t.Errorf("a token without expiry has %d pending schedules, want 0", n)
	}
	b.Settled(t)
	if got := b.AS.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", got)
	}
}

// A fired proactive refresh that a refresher took and then died with
// (fetched, never acknowledged, as after a SIGKILL) is delivered again in
// time for another refresher to refresh the token before it expires, with
// the default 30 s AckWait: the due lane waits at most 5 s for an ack. With
// 30 s there, a soak with one refresher killed handed out 18 expired tokens.
func TestFiredRefreshOfADeadRefresherIsRefreshedBeforeExpiry(t *testing.T) {
	t.Parallel()
	// The refresh fires 20–10 s before expiry; with the work lane's ack
	// wait it would come again 10–20 s after the token expired.
	const lifetime, lead = 40, 20 * time.Second
	tune := func(c *workers.Config) { c.AckWait, c.RefreshLead = 30*time.Second, lead }
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600)
	b.StartPools(t, 1, tune)
	key := fleet.MustKey(t, "acme.orphan.github")
	reg := b.Register(t, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = lifetime })
	b.StopPools(t)

	cons, err := b.JS.Consumer(t.Context(), b.Subj.SchedulesStream(), "refreshers-due")
	if err != nil {
		t.Fatal(err)
	}
	// The refresher that dies: it takes the fired event and never settles it.
	batch, err := cons.Fetch(1, jetstream.FetchMaxWait(lifetime*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	msg, ok := <-batch.Messages()
	if !ok {
		t.Fatalf("the proactive refresh did not fire within %ds: %v", lifetime, batch.Error())
	}
	taken := time.Now()
	t.Logf("fired and taken %v before expiry", reg.ExpiresAt.Sub(taken).Round(time.Millisecond))
	_ = msg // held, as by a process that was killed

	b.StartPools(t, 1, tune)
	fleet.Eventually(t, time.Until(reg.ExpiresAt)+10*time.Second, "the credential refreshed by the surviving refresher", func() bool {
		c, _, err := b.Store.Get(context.Background(), key)
		return err == nil && c.Version == 2
	})
	calls := b.AS.CallLog()
	if len(calls) != 1 {
		t.Fatalf("token-endpoint calls = %d, want 1", len(calls))
	}
	t.Logf("refreshed %v after the event was taken, %v before expiry",
		calls[0].At.Sub(taken).Round(time.Millisecond), reg.ExpiresAt.Sub(calls[0].At).Round(time.Millisecond))
	if !calls[0].At.Before(reg.ExpiresAt) {
		t.Errorf("refreshed at %s, after the token expired at %s: the held event came back too late",
			calls[0].At.Format(time.StampMilli), reg.ExpiresAt.Format(time.StampMilli))
	}
}
