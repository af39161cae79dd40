package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// The tenant attack matrix (docs/security.md): tenant acme is hostile and
// acts only through its own NATS user, as `refresher permissions` prints
// it, against a running refresher; tenant bravo is its victim. Each attack
// is repeated, and what it aims at is counted afterwards. The attacks that
// live below the transport (SSRF, breakers, hostile answers, sealing,
// request lanes) are tested in the packages that hold them; docs/security.md
// names those tests.

// victim registers bravo's credential with a token of an hour, so that a
// proactive refresh is scheduled, and returns its key, fingerprint and the
// sequence of its pending schedule.
func (d *tenantDeployment) victim(t *testing.T) (events.Key, string, uint64) {
	t.Helper()
	key := fleet.MustKey(t, "bravo.bob.github")
	reg, err := d.register(t, d.b, key, func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 })
	if err != nil {
		t.Fatalf("bravo registers: %v", err)
	}
	var seq uint64
	fleet.Eventually(t, 5*time.Second, "bravo's proactive refresh is scheduled", func() bool {
		seq = d.scheduleSeq(key)
		return seq != 0
	})
	return key, reg.Fingerprint, seq
}

// attacker registers acme's own credential and returns its key and
// fingerprint.
func (d *tenantDeployment) attacker(t *testing.T, user string) (events.Key, string) {
	t.Helper()
	key := fleet.MustKey(t, "acme."+user+".github")
	reg, err := d.register(t, d.a, key, nil)
	if err != nil {
		t.Fatalf("acme registers: %v", err)
	}
	return key, reg.Fingerprint
}

// scheduleSeq is the sequence of key's pending schedule, 0 when none.
func (d *tenantDeployment) scheduleSeq(key events.Key) uint64 {
	s, err := d.js.Stream(context.Background(), d.subj.SchedulesStream())
	if err != nil {
		return 0
	}
	m, err := s.GetLastMsgForSubject(context.Background(), d.subj.Schedule(key))
	if err != nil {
		return 0
	}
	return m.Sequence
}

// TestTenantAttacks runs the matrix, against refreshers that serve as a
// user of its own (the deployment's way) and against refreshers that serve
// on their only connection, where no permission stands behind the
// refresher's own checks.
func TestTenantAttacks(t *testing.T) {
	for _, combined := range []bool{false, true} {
		t.Run(map[bool]string{false: "serving user", true: "one user"}[combined], func(t *testing.T) {
			tenantAttacks(t, startTenants(t, combined, nil))
		})
	}
}

func tenantAttacks(t *testing.T, d *tenantDeployment) {
	bKey, bFP, bSched := d.victim(t)
	_, bRev, err := d.store.Get(context.Background(), bKey)
	if err != nil {
		t.Fatal(err)
	}
	aKey, aFP := d.attacker(t, "mallory")
	const tries = 20

	// What bravo receives, on its inbox and its events, throughout.
	var bInbox, bEvents atomic.Int64
	for subject, n := range map[string]*atomic.Int64{"_INBOX_bravo.>": &bInbox, "auth.rotated.bravo.>": &bEvents, "auth.needs_reauth.bravo.>": &bEvents} {
		if _, err := d.b.nc.Subscribe(subject, func(*nats.Msg) { n.Add(1) }); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.b.nc.Flush(); err != nil {
		t.Fatal(err)
	}

	// Stream-wide JetStream headers on acme's own subject: schedules that
	// would purge or forge bravo's, a roll-up that would empty the queue,
	// expected-last-* headers that answer with another tenant's last
	// message. The intake writes none of them into the stream.
	t.Run("stream-wide headers", func(t *testing.T) {
		attacks := []nats.Header{
			{"Nats-Schedule-Next": {"purge"}, "Nats-Scheduler": {d.subj.Schedule(bKey)}},
			{"Nats-Schedule-Next": {"purge"}, "Nats-Scheduler": {d.subj.LegacySchedule(bKey)}},
			{"Nats-Schedule": {"@every 1s"}, "Nats-Schedule-Target": {d.subj.Work(events.Type401, bKey)}},
			{"Nats-Schedule": {"@every 1s"}, "Nats-Schedule-Target": {d.subj.Due(events.TypeExpiring, bKey)}},
			{"Nats-Schedule": {"@every 1s"}, "Nats-Schedule-Target": {d.subj.Event(events.Type401, bKey)}},
			{"Nats-Rollup": {"all"}},
			{"Nats-Rollup": {"sub"}},
			{"Nats-Expected-Last-Msg-Id": {"no-such-id"}},
			{"Nats-Expected-Last-Sequence": {"1"}},
			{"Nats-Expected-Last-Subject-Sequence": {"1"}, "Nats-Expected-Last-Subject-Sequence-Subject": {"auth.work.401.bravo.>"}},
			{"Nats-TTL": {"1s"}},
		}
		for i := range tries {
			for j, h := range attacks {
				// A fingerprint of its own per attack, so that none is
				// answered as a duplicate before it is written.
				fp := events.Fingerprint(fmt.Sprintf("acme-token-%d-%d", i, j))
				ack, err := d.report(d.a, aKey, fp, h)
				if err != nil {
					t.Fatalf("acme's own report with %v: %v", h, err)
				}
				if ack.Stream != d.subj.EventsStream() || ack.Duplicate {
					t.Errorf("acme's report with %v: ack %+v, want a new event in %s", h, ack, d.subj.EventsStream())
				}
			}
		}
		// What was written carries the protocol's id and nothing of the
		// attack: read acme's last work event from the stream.
		s, err := d.js.Stream(context.Background(), d.subj.EventsStream())
		if err != nil {
			t.Fatal(err)
		}
		if m, err := s.GetLastMsgForSubject(context.Background(), "auth.*.401.acme.>"); err == nil {
			for k := range m.Header {
				if k != jetstream.MsgIDHeader && k != "traceparent" && k != "tracestate" {
					t.Errorf("the intake wrote header %s of acme's into the stream", k)
				}
			}
		} else if !errors.Is(err, jetstream.ErrMsgNotFound) {
			t.Fatal(err)
		}
		if got := d.scheduleSeq(bKey); got != bSched {
			t.Errorf("bravo's pending schedule is at sequence %d, want %d untouched", got, bSched)
		}
	})

	// The Nats-Msg-Id of bravo's next report, sent by acme on its own
	// subject, would have made the stream drop bravo's genuine 401 for 30
	// s. The intake computes ids from the subject it took the event on.
	t.Run("forged Nats-Msg-Id", func(t *testing.T) {
		for range tries {
			h := nats.Header{jetstream.MsgIDHeader: {events.MsgID(events.Type401, bKey, bFP)}}
			if _, err := d.report(d.a, aKey, aFP, h); err != nil {
				t.Fatal(err)
			}
		}
		ack, err := d.report(d.b, bKey, bFP, nil)
		if err != nil {
			t.Fatal(err)
		}
		if ack.Duplicate {
			t.Fatal("bravo's genuine 401 was dropped as a duplicate of acme's forged reports")
		}
		fleet.Eventually(t, 10*time.Second, "bravo's 401 rotates its token and bravo hears of it", func() bool {
			c, _, err := d.store.Get(context.Background(), bKey)
			return err == nil && c.Version == 2 && bEvents.Load() > 0
		})
		_, bRev, _ = d.store.Get(context.Background(), bKey)
		bSched = d.scheduleSeq(bKey)
		// What bravo asked for: its rotation, and the answer to its report.
		if err := d.b.nc.Flush(); err != nil {
			t.Fatal(err)
		}
		bEvents.Store(0)
		bInbox.Store(0)
	})

	// The confused deputy: acme's requests and reports for its own key,
	// with reply subjects that would make the refresher write elsewhere
	// with its own rights. None is answered.
	t.Run("reply subjects", func(t *testing.T) {
		replies := []string{
			"$KV." + d.subj.BucketName("CREDENTIALS") + "." + bKey.String(),
			"$KV." + d.subj.BucketName("LEASES") + "." + bKey.String(),
			"$JS.API.STREAM.PURGE." + d.subj.EventsStream(),
			"$JS.API.STREAM.DELETE." + d.subj.EventsStream(),
			"$JS.API.STREAM.PURGE." + d.subj.SchedulesStream(),
			d.subj.Schedule(bKey),
			d.subj.LegacySchedule(bKey),
			d.subj.Due(events.TypeExpiring, bKey),
			d.subj.Work(events.Type401, bKey),
			d.subj.Event(events.TypeRotated, bKey),
			"_INBOX_bravo.stolen",
		}
		report, _ := events.Encode(aKey, "test/acme", events.Unauthorized{Fingerprint: aFP, Runtime: "acme"})
		for range tries {
			for _, reply := range replies {
				for _, r := range []struct {
					subject string
					body    []byte
				}{
					{d.subj.Token(aKey), nil},
					{d.subj.Register(aKey), []byte("{}")},
					{d.subj.Event(events.Type401, aKey), report},
					{d.subj.Event(events.Type401, aKey), []byte("not json")},
				} {
					m := nats.NewMsg(r.subject)
					m.Reply, m.Data = reply, r.body
					if err := d.a.nc.PublishMsg(m); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
		if err := d.a.nc.Flush(); err != nil {
			t.Fatal(err)
		}
		// Every request is refused (a token and a register request per
		// reply; reports are refused silently); wait for that, but look at
		// what the attack aimed at whether or not it comes.
		want := tries * len(replies) * 2
		deadline := time.Now().Add(10 * time.Second)
		refused := 0
		for ; time.Now().Before(deadline); <-time.After(20 * time.Millisecond) {
			if refused = len(d.logs.Records(map[string]string{"msg": "request refused: its reply subject is not the requester's inbox"})); refused >= want {
				break
			}
		}
		defer func() {
			if refused < want {
				t.Errorf("%d of %d requests with a foreign reply subject were refused", refused, want)
			}
		}()
		if err := d.b.nc.Flush(); err != nil {
			t.Fatal(err)
		}
		if _, rev, err := d.store.Get(context.Background(), bKey); err != nil || rev != bRev {
			t.Errorf("bravo's record: revision %d (%v), want %d untouched", rev, err, bRev)
		}
		leases, err := d.js.KeyValue(context.Background(), d.subj.BucketName("LEASES"))
		if err != nil {
			t.Fatal(err)
		}
		if e, err := leases.Get(context.Background(), bKey.String()); err == nil {
			t.Errorf("bravo's credential has a lease: %q", e.Value())
		}
		if got := d.scheduleSeq(bKey); got != bSched {
			t.Errorf("bravo's pending schedule is at sequence %d, want %d", got, bSched)
		}
		if n := bInbox.Load() + bEvents.Load(); n != 0 {
			t.Errorf("bravo received %d messages it did not ask for", n)
		}
		if _, err := d.js.Stream(context.Background(), d.subj.EventsStream()); err != nil {
			t.Errorf("the events stream: %v", err)
		}
	})

	// On bravo's subjects acme's user may do nothing at all.
	t.Run("another tenant's subjects", func(t *testing.T) {
		data, _ := events.Encode(bKey, "test/acme", events.Unauthorized{Fingerprint: bFP, Runtime: "acme"})
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		if _, err := d.a.js.Publish(ctx, d.subj.Event(events.Type401, bKey), data); err == nil {
			t.Error("acme reported a 401 for bravo's key")
		}
		for _, s := range []string{d.subj.Token(bKey), d.subj.Register(bKey)} {
			if _, err := d.a.nc.Request(s, []byte("{}"), 300*time.Millisecond); err == nil {
				t.Errorf("acme's request on %s was answered", s)
			}
		}
		for _, s := range []string{"$JS.API.STREAM.INFO." + d.subj.EventsStream(), "$JS.API.STREAM.INFO." + d.subj.SchedulesStream(),
			"$KV." + d.subj.BucketName("CREDENTIALS") + ".>", "auth.work.401.acme.mallory.github"} {
			if _, err := d.a.nc.Request(s, nil, 300*time.Millisecond); err == nil {
				t.Errorf("acme's request on %s was answered", s)
			}
		}
		// Nor may it write a schedule or a fired one, even for its own
		// key: only refreshers schedule, and only the server fires.
		for _, s := range []string{d.subj.Schedule(aKey), d.subj.LegacySchedule(aKey), d.subj.Due(events.TypeExpiring, aKey),
			d.subj.Schedule(bKey), d.subj.Due(events.TypeExpiring, bKey)} {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			_, err := d.a.js.Publish(ctx, s, data)
			cancel()
			if err == nil {
				t.Errorf("acme's publish on %s was stored", s)
			}
		}
	})
}

// A tenant whose token endpoint hangs holds at most TenantWorkers of a
// refresher's workers: another tenant's 401 rotates while all of its
// calls still hang.
func TestTenantSlowEndpointHoldsItsShare(t *testing.T) {
	d := startTenantDeployment(t, nil)
	const slowClient, creds = "acme-slow-client", 12
	d.as.AddClient(slowClient, "slow-secret")
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	var hung atomic.Int64
	d.as.OnToken(func(r *http.Request) {
		if id, _, _ := r.BasicAuth(); id == slowClient {
			hung.Add(1)
			<-release
			hung.Add(-1)
		}
	})
	var keys []events.Key
	var fps []string
	for i := range creds {
		key := fleet.MustKey(t, fmt.Sprintf("acme.slow%d.github", i))
		tok := d.as.Issue(slowClient)
		reg, err := d.register(t, d.a, key, func(r *events.RegisterRequest) {
			r.Token = events.RegisterToken{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresIn: 3600}
			r.ClientID, r.ClientSecret = slowClient, "slow-secret"
		})
		if err != nil {
			t.Fatal(err)
		}
		keys, fps = append(keys, key), append(fps, reg.Fingerprint)
	}
	bKey, bFP, _ := d.victim(t)
	for i, key := range keys {
		if _, err := d.report(d.a, key, fps[i], nil); err != nil {
			t.Fatal(err)
		}
	}
	// The deployment's pool has 8 workers: a tenant may hold all but an
	// eighth of them (Config.TenantWorkers).
	const share = 7
	fleet.Eventually(t, 10*time.Second, "acme's calls hang", func() bool { return hung.Load() == share })
	if _, err := d.report(d.b, bKey, bFP, nil); err != nil {
		t.Fatal(err)
	}
	fleet.Eventually(t, 10*time.Second, "bravo's 401 rotates while acme's calls hang", func() bool {
		c, _, err := d.store.Get(context.Background(), bKey)
		return err == nil && c.Version == 2
	})
	if n := hung.Load(); n != share {
		t.Errorf("%d of acme's calls hang, want its share %d: no more, and none finished", n, share)
	}
	releaseOnce.Do(func() { close(release) })
	fleet.Eventually(t, 20*time.Second, "acme's refreshes end", func() bool {
		for _, key := range keys {
			if c, _, err := d.store.Get(context.Background(), key); err != nil || c.Version != 2 {
				return false
			}
		}
		return true
	})
}

// A flood beyond what may wait in the work queue is refused (503), never
// written: the store cannot be filled by a tenant's reports.
func TestTenantFloodIsBounded(t *testing.T) {
	const maxQueued = 20
	d := startTenantDeployment(t, func(c *workers.Config) { c.MaxQueued = maxQueued })
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	d.as.OnToken(func(*http.Request) { <-release })
	var keys []events.Key
	var fps []string
	for i := range 3 * maxQueued {
		key, fp := d.attacker(t, fmt.Sprintf("flood%d", i))
		keys, fps = append(keys, key), append(fps, fp)
	}
	refused := 0
	for i, key := range keys {
		_, err := d.report(d.a, key, fps[i], nil)
		var apiErr *jetstream.APIError
		switch {
		case errors.As(err, &apiErr) && apiErr.Code == http.StatusServiceUnavailable:
			refused++
			if !strings.Contains(apiErr.Description, "wait for a refresher already") {
				t.Errorf("refusal %q does not say why", apiErr.Description)
			}
		case err != nil:
			t.Fatal(err)
		}
		if i == maxQueued {
			// The count the intake checks is at most a second old: let
			// it see the queue full before the rest come.
			fleet.Eventually(t, 5*time.Second, "the queue counts its events", func() bool {
				_, err := d.report(d.a, key, events.Fingerprint(fmt.Sprint("probe-", time.Now().UnixNano())), nil)
				return err != nil
			})
		}
	}
	if refused == 0 {
		t.Fatalf("%d reports beyond a queue of %d, none refused", len(keys), maxQueued)
	}
	t.Logf("%d of %d reports refused with a queue of %d", refused, len(keys), maxQueued)
}
