package workers

import (
	"log/slog"
	"time"
)

// outcome is what processing one delivery of an event came to. Each has one
// row in outcomes: how the event is settled, how loudly it is logged,
// whether the attempt failed, and what becomes of the events that joined
// its refresh (see flight).
type outcome int

const (
	outRotated     outcome = iota // a new token is stored and announced
	outStale                      // the event is about an older token: the current one was re-announced
	outNeedsReauth                // only a person can repair the credential; announced
	outNotDue                     // an auth.expiring that arrived before the refresh was due
	outLostRace                   // another refresher redeemed the refresh token first; its result re-announced
	outDiscarded                  // the refresh lost its compare-and-set to a newer write; nothing announced
	outLeaseHeld                  // another worker holds the credential's lease
	outTransient                  // the token endpoint failed in a way a retry may fix
	outBreakerOpen                // the token endpoint's breaker refuses calls
	outCanceled                   // the refresh was given up by shutdown
	outNATS                       // a NATS or JetStream operation failed
	outBadInput                   // the event cannot be decoded or is not valid
	outUnknownCred                // the credential is not registered
	outStoreFailed                // a redeemed token could not be stored
	outLeaseLost                  // the lease was lost before a permanent failure could be recorded
	outRequeued                   // the refresh this event joined did not finish: decided again on redelivery
	outParked                     // an auth.expiring the open breaker refused: rescheduled for after it half-opens (keep.go)
	outTenantBusy                 // the event's tenant has as many events waiting in this refresher as it may
)

// How an event is settled.
type action int

const (
	actionAck action = iota
	actionNak
	actionTerm
)

// joinedFate is how the events that joined a refresh are settled once it
// comes to an outcome.
type joinedFate int

const (
	// joinedRequeue: sent back to the stream, each decided on its own.
	joinedRequeue joinedFate = iota
	// joinedAnswered: a token is in force and was announced: acked as stale.
	joinedAnswered
	// joinedReauth: needs_reauth was announced: acked as such.
	joinedReauth
)

// outcomes is the one table of what each outcome means. Its names are what
// logs and the authbus.events.processed metric show (the Grafana dashboard
// reads them).
var outcomes = [...]struct {
	name   string
	action action
	level  slog.Level // of the "event processed" line
	failed bool       // the attempt failed: its span gets an error status
	joined joinedFate
}{
	outRotated:     {"rotated", actionAck, slog.LevelInfo, false, joinedAnswered},
	outStale:       {"stale", actionAck, slog.LevelDebug, false, joinedAnswered},
	outNeedsReauth: {"needs_reauth", actionAck, slog.LevelInfo, false, joinedReauth},
	outNotDue:      {"not_due", actionAck, slog.LevelDebug, false, joinedRequeue},
	outLostRace:    {"lost_race", actionAck, slog.LevelInfo, false, joinedAnswered},
	outDiscarded:   {"discarded", actionAck, slog.LevelInfo, false, joinedRequeue},
	outLeaseHeld:   {"lease_held", actionNak, slog.LevelDebug, false, joinedRequeue},
	outTransient:   {"transient", actionNak, slog.LevelInfo, true, joinedRequeue},
	outBreakerOpen: {"breaker_open", actionNak, slog.LevelInfo, false, joinedRequeue},
	outCanceled:    {"canceled", actionNak, slog.LevelInfo, false, joinedRequeue},
	outNATS:        {"nats_unavailable", actionNak, slog.LevelInfo, true, joinedRequeue},
	outBadInput:    {"bad_input", actionTerm, slog.LevelWarn, true, joinedRequeue},
	outUnknownCred: {"unknown_credential", actionTerm, slog.LevelWarn, true, joinedRequeue},
	outStoreFailed: {"store_failed", actionNak, slog.LevelWarn, true, joinedRequeue},
	outLeaseLost:   {"lease_lost", actionNak, slog.LevelInfo, false, joinedRequeue},
	outRequeued:    {"requeued", actionNak, slog.LevelDebug, false, joinedRequeue},
	outParked:      {"parked", actionAck, slog.LevelInfo, false, joinedRequeue},
	outTenantBusy:  {"tenant_busy", actionNak, slog.LevelDebug, false, joinedRequeue},
}

func (o outcome) String() string { return outcomes[o].name }

// result is what processing one event came to, and how to settle it.
type result struct {
	outcome outcome
	action  action        // outcomes[outcome].action, or actionTerm once the event gave up
	delay   time.Duration // for actionNak
	detail  string        // term reason or log detail; never a secret
	version int64
}

// resultOf is a result of an outcome settled as its row says.
func resultOf(o outcome, delay time.Duration, detail string) result {
	return result{outcome: o, action: outcomes[o].action, delay: delay, detail: detail}
}

// answered is a result that reports the credential version it answered with.
func answered(o outcome, version int64) result {
	r := resultOf(o, 0, "")
	r.version = version
	return r
}
