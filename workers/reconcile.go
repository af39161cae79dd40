package workers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
)

// ReconcileReport is what one pass of Reconcile found and did.
type ReconcileReport struct {
	Credentials int           // keys listed in the credential bucket
	Covered     int           // of those, with a pending schedule or a pending auth.expiring
	Quiet       int           // without either, but found needing none (re-auth, no expiry) by an earlier pass and not written since
	Checked     int           // the others, read from the bucket one by one
	Restored    int           // schedules written for active credentials with an expiry that had none
	Failed      int           // credentials that could not be read or scheduled; the next pass tries again
	Took        time.Duration // the whole pass
}

// reconcileWorkers bounds the credentials Reconcile reads and schedules at
// once.
const reconcileWorkers = 8

// Reconcile makes sure every active credential with an expiry has a
// pending proactive refresh, and writes the schedule of each that has none
// (a refresher that crashed between storing a token and scheduling it, a
// schedule publish that failed). Run calls it shortly after it starts and
// then every Config.ReconcileEvery; it is safe to call at any time, from
// any number of refreshers at once (a schedule written twice replaces
// itself), but not concurrently on one Pool.
//
// It never holds the credentials in memory: the subjects of the pending
// schedules and auth.expiring events come from the events stream one page
// (up to 100 000 subjects) at a time and are kept as 8-byte hashes; the
// bucket's keys and revisions are streamed past them, and only a key with
// neither is read, checked once more on its own, and scheduled. A
// credential read that needs no schedule (it needs re-auth, or its token
// has no expiry) is remembered as a hash of its key and revision, and not
// read again until it is written.
func (p *Pool) Reconcile(ctx context.Context) (ReconcileReport, error) {
	start := time.Now()
	var rep ReconcileReport
	covered, err := p.coveredKeys(ctx)
	if err != nil {
		return rep, err
	}
	// The watcher's goroutine ends with ctx; our own cancel ends it when
	// we return early.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := p.store.Bucket().WatchAll(ctx, jetstream.IgnoreDeletes(), jetstream.MetaOnly())
	if err != nil {
		return rep, fmt.Errorf("reconcile: list credentials: %w", err)
	}
	defer func() { _ = w.Stop() }()
	wasQuiet := p.keeper.quietSet()
	var (
		mu                        sync.Mutex
		quiet                     []uint64
		checked, restored, failed atomic.Int64
		g                         errgroup.Group
	)
	g.SetLimit(reconcileWorkers)
	for e := range w.Updates() {
		if e == nil {
			break // the end of the keys that exist now
		}
		rep.Credentials++
		if covered.has(e.Key()) {
			rep.Covered++
			continue
		}
		if h := wasQuiet.revision(e.Key(), e.Revision()); wasQuiet.hasHash(h) {
			rep.Quiet++
			mu.Lock()
			quiet = append(quiet, h)
			mu.Unlock()
			continue
		}
		k, err := events.ParseKey(e.Key())
		if err != nil {
			continue // not a credential key: written by something else
		}
		checked.Add(1)
		g.Go(func() error {
			did, rev, err := p.restore(ctx, k)
			switch {
			case err != nil:
				failed.Add(1)
				p.log.Warn("reconcile: could not check or restore a proactive refresh; the next pass tries again", "key", k.String(), "error", err)
			case did:
				restored.Add(1)
			case rev != 0:
				mu.Lock()
				quiet = append(quiet, wasQuiet.revision(k.String(), rev))
				mu.Unlock()
			}
			return nil
		})
	}
	_ = g.Wait()
	rep.Checked, rep.Restored, rep.Failed = int(checked.Load()), int(restored.Load()), int(failed.Load())
	rep.Took = time.Since(start)
	// The watcher closes its channel on cancellation as well as at the
	// end: a cancelled pass must not pass for a complete one.
	if err := ctx.Err(); err != nil {
		return rep, fmt.Errorf("reconcile: %w", err)
	}
	p.keeper.setQuiet(quiet)
	p.keeper.count(ctx, "reconciled", rep.Restored)
	return rep, nil
}

// restore schedules the proactive refresh of k if it is an active
// credential with an expiry and still has neither a pending schedule nor a
// pending auth.expiring (the listing is not a snapshot: one may have been
// written since). It reports whether it wrote one, and the revision of a
// credential that needs none (0 otherwise).
func (p *Pool) restore(ctx context.Context, k events.Key) (wrote bool, quietRev uint64, err error) {
	c, rev, err := p.store.Get(ctx, k)
	if errors.Is(err, kv.ErrNotFound) {
		return false, 0, nil // deleted since the listing
	}
	if err != nil {
		return false, 0, err
	}
	if c.State != kv.StateActive || c.ExpiresAt.IsZero() {
		return false, rev, nil
	}
	for _, at := range p.pendingPlaces() {
		subject := at.subject(k)
		info, err := at.stream.Info(ctx, jetstream.WithSubjectFilter(subject))
		if err != nil {
			return false, 0, fmt.Errorf("look up %s: %w", subject, err)
		}
		if info.State.Subjects[subject] > 0 {
			return false, 0, nil
		}
	}
	// Written from the record just read: if a rotation stores a newer
	// token meanwhile and this write lands after its schedule, the
	// schedule fires stale and keepScheduled writes the current one.
	if err := p.scheduleSync(ctx, c, p.nextAt(c)); err != nil {
		return false, 0, err
	}
	p.log.Info("reconcile: restored a missing proactive refresh", "key", k.String(), "version", c.Version, "expires_at", c.ExpiresAt)
	return true, 0, nil
}

// keySet is a set of credential keys (or of keys at a revision) as sorted
// 64-bit hashes: 8 bytes each. A collision (about one in 10^7 passes at a
// million credentials) takes a missing schedule for present until a pass
// with another seed: the next one for covered keys, the next start of the
// pool for quiet ones.
type keySet struct {
	seed   maphash.Seed
	hashes []uint64
}

func (s *keySet) has(key string) bool { return s.hasHash(maphash.String(s.seed, key)) }

func (s *keySet) hasHash(h uint64) bool {
	_, ok := slices.BinarySearch(s.hashes, h)
	return ok
}

// revision is the hash of key at revision rev.
func (s *keySet) revision(key string, rev uint64) uint64 {
	var h maphash.Hash
	h.SetSeed(s.seed)
	h.WriteString(key)
	maphash.WriteComparable(&h, rev)
	return h.Sum64()
}

// quietSet returns the credentials the last pass found needing no
// schedule, as hashes of key and revision.
func (k *keeper) quietSet() *keySet {
	k.mu.Lock()
	defer k.mu.Unlock()
	return &keySet{seed: k.seed, hashes: k.quiet}
}

// setQuiet keeps what this pass found needing no schedule, for the next.
func (k *keeper) setQuiet(hashes []uint64) {
	slices.Sort(hashes)
	k.mu.Lock()
	defer k.mu.Unlock()
	k.quiet = hashes
}

// coveredKeys returns the keys that have a pending schedule or a pending
// auth.expiring, in the schedules stream or, left by an earlier version,
// in the events stream. It notes whether the events stream still holds
// such schedules (see Pool.legacySchedules).
func (p *Pool) coveredKeys(ctx context.Context) (*keySet, error) {
	s := &keySet{seed: maphash.MakeSeed()}
	add := func(k events.Key) { s.hashes = append(s.hashes, maphash.String(s.seed, k.String())) }
	legacy := 0
	for _, at := range p.pendingPlaces() {
		err := p.eachSubject(ctx, at.stream.CachedInfo().Config.Name, at.wildcard, func(subject string) {
			if at.legacy {
				legacy++
			}
			var (
				k   events.Key
				err error
			)
			if at.schedule {
				_, k, err = p.subj.Parse(subject)
			} else {
				_, k, err = p.subj.ParseWork(subject)
			}
			if err == nil {
				add(k)
			}
		})
		if err != nil {
			return nil, err
		}
	}
	p.legacySchedules.Store(legacy > 0)
	slices.Sort(s.hashes)
	return s, nil
}

// pendingAt is a place where a credential's next proactive refresh may
// wait: a schedule, or an auth.expiring a schedule fired (or a runtime
// reported) that no refresher has taken yet.
type pendingAt struct {
	stream   jetstream.Stream
	subject  func(events.Key) string // the credential's subject there
	wildcard string                  // every credential's
	schedule bool                    // a schedule subject, not a lane's
	legacy   bool                    // a schedule an earlier version wrote
}

// pendingPlaces lists every pendingAt, for restore and coveredKeys alike:
// a place one of them missed would make the reconciler write a second
// schedule.
func (p *Pool) pendingPlaces() []pendingAt {
	expiring := func(f func(events.Type, events.Key) string) func(events.Key) string {
		return func(k events.Key) string { return f(events.TypeExpiring, k) }
	}
	return []pendingAt{
		{stream: p.sched, subject: p.subj.Schedule, wildcard: p.subj.ScheduleWildcard(), schedule: true},
		{stream: p.sched, subject: expiring(p.subj.Due), wildcard: p.subj.DueWildcard(events.TypeExpiring)},
		{stream: p.work, subject: p.subj.LegacySchedule, wildcard: p.subj.LegacyScheduleWildcard(), schedule: true, legacy: true},
		{stream: p.work, subject: expiring(p.subj.Work), wildcard: p.subj.WorkWildcard(events.TypeExpiring)},
		{stream: p.work, subject: expiring(p.subj.Slow), wildcard: p.subj.SlowWildcard(events.TypeExpiring)},
	}
}

// findLegacySchedules notes whether the events stream holds a schedule an
// earlier version wrote there (see Pool.legacySchedules).
func (p *Pool) findLegacySchedules(ctx context.Context) error {
	_, err := p.work.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(p.subj.LegacyScheduleWildcard()))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		p.legacySchedules.Store(false)
	case err != nil:
		return fmt.Errorf("look for schedules an earlier version left in stream %s: %w; check that JetStream answers", p.subj.EventsStream(), err)
	default:
		p.legacySchedules.Store(true)
	}
	return nil
}

// streamInfoPage is the part of a STREAM.INFO answer with subject details
// that eachSubject reads.
type streamInfoPage struct {
	Error  *jetstream.APIError `json:"error,omitempty"`
	Total  int                 `json:"total"`
	Offset int                 `json:"offset"`
	State  struct {
		Subjects map[string]uint64 `json:"subjects"`
	} `json:"state"`
}

// eachSubject calls f for every subject of stream matching filter that
// holds messages. nats.go's Stream.Info gathers every page into one map
// (a million subjects would be held at once); this asks the same API for
// one page at a time. Pages are taken at different moments, so a subject
// written or removed meanwhile may be missed or seen twice: callers check
// what they act on.
func (p *Pool) eachSubject(ctx context.Context, stream, filter string, f func(subject string)) error {
	api := p.apiPrefix() + "STREAM.INFO." + stream
	for offset := 0; ; {
		req, _ := json.Marshal(map[string]any{"subjects_filter": filter, "offset": offset})
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		msg, err := p.nc.RequestWithContext(rctx, api, req)
		cancel()
		if err != nil {
			return fmt.Errorf("reconcile: subjects of %s (%s, offset %d): %w; check that JetStream answers", stream, filter, offset, err)
		}
		var page streamInfoPage
		if err := json.Unmarshal(msg.Data, &page); err != nil {
			return fmt.Errorf("reconcile: subjects of %s: %w", stream, err)
		}
		if page.Error != nil {
			return fmt.Errorf("reconcile: subjects of %s (%s): %w", stream, filter, page.Error)
		}
		for subject := range page.State.Subjects {
			f(subject)
		}
		offset += len(page.State.Subjects)
		if len(page.State.Subjects) == 0 || offset >= page.Total {
			return nil
		}
	}
}

// apiPrefix is the JetStream API prefix the pool's JetStream uses.
func (p *Pool) apiPrefix() string {
	o := p.js.Options()
	switch {
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	case o.APIPrefix != "":
		return strings.TrimSuffix(o.APIPrefix, ".") + "."
	}
	return jetstream.DefaultAPIPrefix
}

// reconcileFirst is how long after Run starts the first pass waits, at
// most: long enough that what a crashed predecessor wrote just before it
// died has settled, short enough that a restart repairs it at once.
const reconcileFirst = 5 * time.Second

// reconcileLoop runs Reconcile shortly after Run starts and then every
// ReconcileEvery (spread by ±10 % so that refreshers started together do
// not pass together), until ctx ends.
func (p *Pool) reconcileLoop(ctx context.Context) {
	every := p.cfg.ReconcileEvery
	if every < 0 {
		return
	}
	wait := min(reconcileFirst, every)
	for {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		rep, err := p.Reconcile(ctx)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			p.log.Warn("reconcile: pass failed; the next one tries again", "error", err, "next_in", every)
		default:
			p.log.Info("reconcile: proactive refreshes checked", "credentials", rep.Credentials, "covered", rep.Covered,
				"checked", rep.Checked, "restored", rep.Restored, "failed", rep.Failed, "took", rep.Took)
		}
		wait = every - every/10 + rand.N(every/5+1)
	}
}

// keepSchedules starts the pool's schedule keeping (the reconciler and the
// release of parked credentials) and returns the function that stops it
// and waits for it.
func (p *Pool) keepSchedules(ctx context.Context) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var g errgroup.Group
	g.Go(func() error { p.reconcileLoop(ctx); return nil })
	g.Go(func() error { p.releaseParked(ctx); return nil })
	return func() {
		cancel()
		_ = g.Wait()
	}
}
