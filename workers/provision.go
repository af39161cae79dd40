package workers

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
)

// consumerName is the durable pull consumer every refresher shares.
const consumerName = "refreshers"

// reauthKeep is how long a needs_reauth stays in the stream, so a runtime
// that starts later still learns that a person must log in.
const reauthKeep = 30 * 24 * time.Hour

// provision creates the streams and the consumer when they are missing and
// brings their configuration up to date when they exist, so any number of
// refreshers may start against the same NATS deployment.
func (p *Pool) provision(ctx context.Context) (jetstream.Consumer, error) {
	work, err := p.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        p.subj.EventsStream(),
		Description: "authbus work queue: auth.401 and auth.expiring events and pending proactive-refresh schedules",
		Subjects: []string{
			p.subj.EventWildcard(events.Type401),
			p.subj.EventWildcard(events.TypeExpiring),
			// Schedules must live in the same stream as their target.
			p.subj.ScheduleWildcard(),
		},
		Retention:         jetstream.WorkQueuePolicy,
		Storage:           jetstream.FileStorage,
		Replicas:          p.cfg.Replicas,
		Duplicates:        p.cfg.DuplicateWindow,
		AllowMsgSchedules: true,
		MaxMsgSize:        2 * events.MaxEventSize,
	})
	if err != nil {
		return nil, fmt.Errorf("create or update stream %s: %w; check that the NATS user may manage JetStream streams", p.subj.EventsStream(), err)
	}
	if !work.CachedInfo().Config.AllowMsgSchedules {
		return nil, fmt.Errorf("NATS server %s does not support message scheduling (stream %s has no AllowMsgSchedules): authbus needs nats-server 2.12 or later, upgrade the server",
			p.nc.ConnectedServerVersion(), p.subj.EventsStream())
	}
	if _, err := p.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:              p.subj.ReauthStream(),
		Description:       "authbus: the latest auth.needs_reauth of each credential, kept for runtimes that start later",
		Subjects:          []string{p.subj.EventWildcard(events.TypeNeedsReauth)},
		Retention:         jetstream.LimitsPolicy,
		Storage:           jetstream.FileStorage,
		Replicas:          p.cfg.Replicas,
		MaxMsgsPerSubject: 1,
		MaxAge:            reauthKeep,
	}); err != nil {
		return nil, fmt.Errorf("create or update stream %s: %w", p.subj.ReauthStream(), err)
	}
	cons, err := p.js.CreateOrUpdateConsumer(ctx, p.subj.EventsStream(), jetstream.ConsumerConfig{
		Durable:     consumerName,
		Description: "authbus refreshers",
		// The schedules share the stream but must never reach a worker.
		FilterSubjects: []string{p.subj.EventWildcard(events.Type401), p.subj.EventWildcard(events.TypeExpiring)},
		AckPolicy:      jetstream.AckExplicitPolicy,
		AckWait:        p.cfg.AckWait,
		MaxDeliver:     p.cfg.MaxDeliver,
		MaxAckPending:  -1,
		Replicas:       p.cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("create or update consumer %s on %s: %w", consumerName, p.subj.EventsStream(), err)
	}
	return cons, nil
}
