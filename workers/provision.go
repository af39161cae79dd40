package workers

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
)

// The durable pull consumers every refresher shares: the work lane, the
// slow lane (see intake.go) and the due lane, where the schedules fire.
const (
	consumerName     = "refreshers"
	slowConsumerName = "refreshers-slow"
	dueConsumerName  = "refreshers-due"
)

// reauthKeep is how long a needs_reauth stays in the stream, so a runtime
// that starts later still learns that a person must log in.
const reauthKeep = 30 * 24 * time.Hour

// consumers are the pool's lanes: the work lane and the slow lane on the
// events stream, the due lane on the schedules stream.
type consumers struct{ work, slow, due jetstream.Consumer }

// provision creates the streams and the consumers when they are missing and
// brings their configuration up to date when they exist, so any number of
// refreshers may start against the same NATS deployment. Replicas are the
// deployment's: an existing stream keeps its replica count whatever
// Config.Replicas says (see provisionStream).
func (p *Pool) provision(ctx context.Context) (consumers, error) {
	var none consumers
	if err := p.migrateEvents(ctx); err != nil {
		return none, err
	}
	work, err := p.provisionStream(ctx, jetstream.StreamConfig{
		Name:        p.subj.EventsStream(),
		Description: "authbus work queue: auth.401 and auth.expiring events the intake took in",
		// Only refreshers write these subjects: runtimes publish on their
		// own, and the intake writes what it validated here (intake.go).
		// The legacy schedule subjects stay captured, although this
		// version schedules in the schedules stream: a refresher of an
		// earlier version, still running during a rolling upgrade, writes
		// its schedules there (they fire on the work lane, which is still
		// consumed), and a stream must capture a schedule's target.
		Subjects: []string{
			p.subj.WorkWildcard(events.Type401),
			p.subj.WorkWildcard(events.TypeExpiring),
			p.subj.SlowWildcard(events.Type401),
			p.subj.SlowWildcard(events.TypeExpiring),
			p.subj.LegacyScheduleWildcard(),
		},
		Retention:         jetstream.WorkQueuePolicy,
		Storage:           jetstream.FileStorage,
		Duplicates:        p.cfg.DuplicateWindow,
		AllowMsgSchedules: true,
		MaxMsgSize:        2 * events.MaxEventSize,
	})
	if err != nil {
		return none, err
	}
	if !work.CachedInfo().Config.AllowMsgSchedules {
		return none, fmt.Errorf("NATS server %s does not support message scheduling (stream %s has no AllowMsgSchedules): authbus needs nats-server 2.12 or later, upgrade the server",
			p.nc.ConnectedServerVersion(), p.subj.EventsStream())
	}
	// Created with the events stream's replicas: on a deployment upgraded
	// from a version without it, that is the deployment's count, whatever
	// --replicas the first refresher of this version was given.
	if _, err := p.provisionStreamAt(ctx, work.CachedInfo().Config.Replicas, jetstream.StreamConfig{
		Name:        p.subj.SchedulesStream(),
		Description: "authbus proactive refreshes: one pending schedule per credential, and the auth.expiring events they fired",
		// A schedule fires into the stream that holds it. A stream of its
		// own: JetStream stores one stream's writes one after another, and
		// with every write synced the schedule and the tombstone of the
		// one it replaces halved what the events stream took in.
		Subjects: []string{
			p.subj.ScheduleWildcard(),
			p.subj.DueWildcard(events.TypeExpiring),
		},
		Retention:         jetstream.WorkQueuePolicy,
		Storage:           jetstream.FileStorage,
		AllowMsgSchedules: true,
		MaxMsgSize:        2 * events.MaxEventSize,
		// Not synced on every write, where the server allows it (one
		// replica; see provisionStream): a schedule lost in a crash is
		// written again by the reconciler when the refreshers start, and
		// a removal lost makes a stale schedule fire, which is answered
		// as stale. Every write synced cost a quarter of the refreshes.
		PersistMode: jetstream.AsyncPersistMode,
	}); err != nil {
		return none, err
	}
	if _, err := p.provisionStream(ctx, jetstream.StreamConfig{
		Name:              p.subj.ReauthStream(),
		Description:       "authbus: the latest auth.needs_reauth of each credential, kept for runtimes that start later",
		Subjects:          []string{p.subj.EventWildcard(events.TypeNeedsReauth)},
		Retention:         jetstream.LimitsPolicy,
		Storage:           jetstream.FileStorage,
		MaxMsgsPerSubject: 1,
		MaxAge:            reauthKeep,
	}); err != nil {
		return none, err
	}
	var ls consumers
	for _, lane := range []struct {
		stream, name, description string
		filter                    []string
		ackWait                   time.Duration
		c                         *jetstream.Consumer
	}{
		{p.subj.EventsStream(), consumerName, "authbus refreshers: the work lane",
			[]string{p.subj.WorkWildcard(events.Type401), p.subj.WorkWildcard(events.TypeExpiring)}, p.cfg.AckWait, &ls.work},
		{p.subj.EventsStream(), slowConsumerName, "authbus refreshers: the slow lane, taken when the work lane is empty",
			[]string{p.subj.SlowWildcard(events.Type401), p.subj.SlowWildcard(events.TypeExpiring)}, p.cfg.AckWait, &ls.slow},
		{p.subj.SchedulesStream(), dueConsumerName, "authbus refreshers: the due lane, proactive refreshes taken with the work lane",
			[]string{p.subj.DueWildcard(events.TypeExpiring)}, p.cfg.dueAckWait(), &ls.due},
	} {
		c, err := p.js.CreateOrUpdateConsumer(ctx, lane.stream, jetstream.ConsumerConfig{
			Durable:     lane.name,
			Description: lane.description,
			// The schedules share their stream with what they fire but
			// must never reach a worker.
			FilterSubjects: lane.filter,
			AckPolicy:      jetstream.AckExplicitPolicy,
			AckWait:        lane.ackWait,
			MaxDeliver:     p.cfg.MaxDeliver,
			MaxAckPending:  -1,
			// 0: as many as the stream has, whatever that is now or later.
		})
		if err != nil {
			return none, fmt.Errorf("create or update consumer %s on %s: %w", lane.name, lane.stream, err)
		}
		*lane.c = c
	}
	return ls, nil
}

// migrateEvents moves an events stream of an earlier version, which
// captured the runtimes' own subjects, to the intake: the events still
// queued on those subjects are dropped (their runtimes report again, or
// their schedules fire), and the stream stops capturing them when
// provisionStream updates its subjects. Schedules stay; one that fires on
// the old target is not captured, and the credential is refreshed on its
// next 401.
func (p *Pool) migrateEvents(ctx context.Context) error {
	s, err := p.js.Stream(ctx, p.subj.EventsStream())
	if err != nil {
		return nil // none yet, or provisionStream reports it
	}
	old := []string{p.subj.EventWildcard(events.Type401), p.subj.EventWildcard(events.TypeExpiring)}
	if !slices.ContainsFunc(s.CachedInfo().Config.Subjects, func(x string) bool { return slices.Contains(old, x) }) {
		return nil
	}
	for _, subject := range old {
		if err := s.Purge(ctx, jetstream.WithPurgeSubject(subject)); err != nil {
			return fmt.Errorf("migrate stream %s to the intake: purge %s: %w", p.subj.EventsStream(), subject, err)
		}
	}
	p.log.Warn("the events stream no longer captures runtimes' subjects: the refreshers' intake takes their events in; events queued on the old subjects were dropped",
		"stream", p.subj.EventsStream())
	return nil
}

// provisionStream creates the stream with cfg and Config.Replicas, or
// updates an existing one to cfg with the replica count it has. A refresher
// never changes a deployment's replicas: one started with the default of 1
// must not scale a replicated deployment down, and one started with 3 must
// not scale a deployment up under the refreshers already running on it
// (change replicas with "nats stream edit"). It says so when the two
// differ.
func (p *Pool) provisionStream(ctx context.Context, cfg jetstream.StreamConfig) (jetstream.Stream, error) {
	return p.provisionStreamAt(ctx, p.cfg.Replicas, cfg)
}

// provisionStreamAt is provisionStream creating a missing stream with
// replicas.
func (p *Pool) provisionStreamAt(ctx context.Context, replicas int, cfg jetstream.StreamConfig) (jetstream.Stream, error) {
	for attempt := 1; ; attempt++ {
		existing, err := p.js.Stream(ctx, cfg.Name)
		switch {
		case err == nil:
			cfg.Replicas = existing.CachedInfo().Config.Replicas
			// Fixed when the stream was created.
			cfg.PersistMode = existing.CachedInfo().Config.PersistMode
			p.warnReplicas("stream", cfg.Name, cfg.Replicas)
			s, err := p.js.UpdateStream(ctx, cfg)
			if err != nil {
				return nil, fmt.Errorf("update stream %s: %w; check that the NATS user may manage JetStream streams", cfg.Name, err)
			}
			return s, nil
		case !errors.Is(err, jetstream.ErrStreamNotFound):
			return nil, fmt.Errorf("look up stream %s: %w; check that JetStream is enabled for the NATS user", cfg.Name, err)
		}
		cfg.Replicas = replicas
		if cfg.Replicas > 1 {
			// Replicated streams are made durable by their log.
			cfg.PersistMode = jetstream.DefaultPersistMode
		}
		s, err := p.js.CreateStream(ctx, cfg)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) && attempt == 1 {
			continue // another refresher created it meanwhile: follow it
		}
		if err != nil {
			return nil, fmt.Errorf("create stream %s: %w; check that the NATS user may manage JetStream streams", cfg.Name, err)
		}
		return s, nil
	}
}

// warnReplicas says, once per stream or bucket, that the deployment has
// another replica count than Config.Replicas asks for, and that the
// deployment's is kept.
func (p *Pool) warnReplicas(kind, name string, deployed int) {
	if deployed == p.cfg.Replicas || !p.cfg.replicasSet {
		return
	}
	p.log.Warn("the deployment keeps its replica count; --replicas applies only to streams and buckets a refresher creates",
		kind, name, "deployed", deployed, "asked", p.cfg.Replicas,
		"to change it", fmt.Sprintf("nats stream edit %s --replicas %d", streamOf(kind, name), p.cfg.Replicas))
}

// streamOf names the stream behind a stream or bucket.
func streamOf(kind, name string) string {
	if kind == "bucket" {
		return kv.BucketStream(name)
	}
	return name
}
