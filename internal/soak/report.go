package soak

import (
	"context"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
)

// Report is what a soak came to.
type Report struct {
	Credentials     int     `json:"credentials"`
	LifetimeSeconds float64 `json:"token_lifetime_seconds"`
	DurationSeconds float64 `json:"duration_seconds"`
	Refreshers      string  `json:"refreshers"` // how many, and what they were
	Workers         int     `json:"workers_per_refresher"`
	RefreshLead     string  `json:"refresh_lead"`
	UsesPerSecond   float64 `json:"uses_per_second_asked"`
	Outage          string  `json:"outage,omitempty"`
	Kills           int     `json:"refresher_kills"`
	KilledHow       string  `json:"killed_how"`
	// Registration is how long registering the credentials took (seconds).
	Registration float64 `json:"registration_seconds"`

	// Generations is how many new tokens the runtimes learned of during the
	// soak (registration excluded), and RotationsPerSec the same per
	// second.
	Generations     int     `json:"generations"`
	RotationsPerSec float64 `json:"rotations_per_second"`
	// CallsPerGeneration is, per credential, the token calls answered with
	// a token over the generations it went through: 1.00 everywhere means
	// every generation cost one call.
	CallsPerGeneration Spread `json:"calls_per_generation"`
	TokenCalls         int    `json:"token_calls"`
	// FailedCalls got no token: unanswered (outage), or 5xx.
	FailedCalls int `json:"token_calls_failed"`
	Reuses      int `json:"refresh_token_reuses"`
	NeedsReauth int `json:"needs_reauth"`
	// OutageCalls are the token calls that arrived during the outage: the
	// calls that opened the refreshers' breakers (BreakerOpens times: a
	// run of failures, and the calls already under way then), and the
	// probes of HalfOpens half-open periods, one call each at most.
	// ProbesPerInterval is HalfOpens per refresher per 30 s of outage (the
	// refreshers' default open period): at most 1, and about 1, means one
	// probe per half-open interval per refresher.
	OutageCalls       int     `json:"token_calls_during_outage"`
	BreakerOpens      int     `json:"breaker_opens_during_outage"`
	HalfOpens         int     `json:"half_opens_during_outage"`
	ProbesPerInterval float64 `json:"half_opens_per_refresher_per_interval,omitempty"`

	// Phases splits what the runtimes met by the outage: before, during,
	// after (only the first without an outage).
	Phases []PhaseCounts `json:"phases"`
	// TokenErrors are auth.token requests without a token (timeouts,
	// refusals).
	TokenErrors int `json:"token_request_errors"`
	// Reported401 are the auth.401 events the runtimes published.
	Reported401 int `json:"auth_401_published"`

	// Margin is how long before a token expired its successor reached the
	// runtimes (seconds; negative: after); Late counts the negative ones.
	Margin Percentiles `json:"refresh_margin_seconds"`
	Late   int         `json:"refreshed_after_expiry"`
	// Lag is how late the proactive refreshes reached a refresher: first
	// delivery minus the time their schedule was written for (seconds).
	Lag Percentiles `json:"schedule_lag_seconds"`

	// LostSchedules counts credentials without a pending proactive refresh
	// (nor a fired one waiting in the stream) at the end; Expired those
	// whose current token had expired at the end. Neither counts
	// credentials that need re-auth.
	LostSchedules int `json:"lost_schedules"`
	Expired       int `json:"expired_at_end"`

	// Usage is each refresher's CPU during the soak and peak memory, or
	// the whole process's for in-process pools.
	Usage []Usage `json:"refresher_usage"`
	// Outcomes counts the refreshers' "event processed" log lines by
	// outcome; Warnings their warning and error lines.
	Outcomes map[string]int `json:"outcomes"`
	Warnings int            `json:"refresher_warnings"`
}

// PhaseCounts is what the runtimes met during one phase.
type PhaseCounts struct {
	Phase        string `json:"phase"`
	Uses         int    `json:"uses"`
	Expired      int    `json:"expired_tokens_handed_out"`
	Unauthorized int    `json:"runtime_401s"`
}

// Usage is one refresher's CPU and memory.
type Usage struct {
	Name         string  `json:"name"`
	Incarnations int     `json:"incarnations"`
	CPUSeconds   float64 `json:"cpu_seconds"`
	CPUPercent   float64 `json:"cpu_percent_of_one_core"`
	PeakRSSMiB   float64 `json:"peak_rss_mib"`
}

// Spread is the minimum, mean and maximum of a ratio.
type Spread struct {
	Min  float64 `json:"min"`
	Mean float64 `json:"mean"`
	Max  float64 `json:"max"`
}

// Percentiles summarise values in seconds: nearest rank.
type Percentiles struct {
	N   int     `json:"n"`
	Min float64 `json:"min"`
	P1  float64 `json:"p1"`
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func percentilesOf(xs []float32) Percentiles {
	if len(xs) == 0 {
		return Percentiles{}
	}
	xs = slices.Clone(xs)
	slices.Sort(xs)
	rank := func(p int) float64 { return float64(xs[max(0, (len(xs)*p+99)/100-1)]) }
	return Percentiles{N: len(xs), Min: float64(xs[0]), P1: rank(1), P50: rank(50), P99: rank(99), Max: float64(xs[len(xs)-1])}
}

// report ends the soak's counting: the runtimes have stopped, the
// refreshers still run (a last look at the schedules and their usage).
func (s *soak) report(ctx context.Context) *Report {
	start, _ := s.started()
	elapsed := time.Since(start)
	s.quiesce(ctx)
	cfg := s.cfg
	rep := &Report{
		Credentials:     cfg.Credentials,
		LifetimeSeconds: cfg.Lifetime.Seconds(),
		DurationSeconds: elapsed.Seconds(),
		Workers:         cfg.Workers,
		RefreshLead:     "default (10 % of the lifetime, 30s–10m, at most half)",
		UsesPerSecond:   min(float64(cfg.MaxUses), float64(cfg.Credentials)/cfg.UseEvery.Seconds()),
		Reuses:          s.as.Reuses(),
	}
	if cfg.RefreshLead > 0 {
		rep.RefreshLead = cfg.RefreshLead.String()
	}
	if cfg.Refresher != "" {
		rep.Refreshers = fmt.Sprintf("%d processes of %s", cfg.Refreshers, cfg.Refresher)
		rep.KilledHow = "SIGKILL, then started again"
	} else {
		rep.Refreshers = fmt.Sprintf("%d pools in this process", cfg.Refreshers)
		rep.KilledHow = "NATS connection closed, then started again"
	}
	if cfg.OutageFor > 0 {
		rep.Outage = fmt.Sprintf("token endpoint down from %v for %v", cfg.OutageAt, cfg.OutageFor)
	}
	rep.LostSchedules = s.lostSchedules(ctx)

	self := Usage{Name: "soak process (NATS server, authorization and resource servers, runtimes)", Incarnations: 1}
	if cfg.Refresher != "" {
		for _, r := range s.refreshers {
			cpu, peak, n := r.usage()
			rep.Usage = append(rep.Usage, Usage{Name: r.name, Incarnations: n, CPUSeconds: cpu.Seconds(),
				CPUPercent: 100 * cpu.Seconds() / elapsed.Seconds(), PeakRSSMiB: float64(peak) / (1 << 20)})
		}
	} else {
		self.Name = "whole process (NATS server, authorization and resource servers, runtimes, pools)"
	}
	u := selfUsage().minus(s.self)
	self.CPUSeconds, self.CPUPercent, self.PeakRSSMiB = u.cpu.Seconds(), 100*u.cpu.Seconds()/elapsed.Seconds(), float64(u.peak)/(1<<20)
	rep.Usage = append(rep.Usage, self)
	for _, r := range s.refreshers {
		rep.Kills += r.kills
	}

	c := s.stats
	c.mu.Lock()
	defer c.mu.Unlock()
	var ratios []float64
	now := time.Now()
	rep.Generations = c.generations() - c.genesis
	for i, g := range c.cur {
		if gens := int(g.version - 1); gens > 0 {
			ratios = append(ratios, float64(c.okCalls[i])/float64(gens))
		}
		if !g.reauth && !g.expiresAt.IsZero() && !g.expiresAt.After(now) {
			rep.Expired++
		}
	}
	if len(ratios) > 0 {
		sp := Spread{Min: math.Inf(1), Max: math.Inf(-1)}
		sum := 0.0
		for _, r := range ratios {
			sp.Min, sp.Max, sum = min(sp.Min, r), max(sp.Max, r), sum+r
		}
		sp.Mean = sum / float64(len(ratios))
		rep.CallsPerGeneration = sp
	}
	rep.TokenCalls = c.calls
	rep.FailedCalls = c.failedCalls
	rep.RotationsPerSec = float64(rep.Generations) / elapsed.Seconds()
	rep.NeedsReauth = c.needsReauth
	rep.OutageCalls, rep.BreakerOpens, rep.HalfOpens = c.outageCalls, c.breakerOpens, c.halfOpens
	if cfg.OutageFor > 0 {
		intervals := max(1, cfg.OutageFor.Seconds()/30)
		rep.ProbesPerInterval = float64(c.halfOpens) / float64(cfg.Refreshers) / intervals
	}
	n := phaseSteady + 1
	if cfg.OutageFor > 0 {
		n = phases
	}
	for ph := range n {
		rep.Phases = append(rep.Phases, PhaseCounts{Phase: phaseNames[ph], Uses: c.uses[ph], Expired: c.expired[ph], Unauthorized: c.unauthorized[ph]})
	}
	if cfg.OutageFor == 0 {
		rep.Phases[0].Phase = "the whole soak"
	}
	rep.TokenErrors = c.tokenErrors
	rep.Reported401 = c.reported
	rep.Margin = percentilesOf(c.margins)
	for _, m := range c.margins {
		if m < 0 {
			rep.Late++
		}
	}
	rep.Lag = percentilesOf(c.lags)
	rep.Outcomes = maps.Clone(c.outcomes)
	rep.Warnings = c.warnings
	return rep
}

// quiesce pauses the refreshers' consumers and waits until the refreshes
// in flight are settled and their announcements received, so that token
// calls and generations are counted at the same point: a call answered a
// moment before the count, whose auth.rotated was still on its way, would
// look like a second call for one generation. The refreshers stay paused:
// the soak is over.
func (s *soak) quiesce(ctx context.Context) {
	// The workers package's work lane and due lane (fired schedules).
	consumers := [][2]string{{s.subj.EventsStream(), "refreshers"}, {s.subj.SchedulesStream(), "refreshers-due"}}
	for _, c := range consumers {
		if _, err := s.js.PauseConsumer(ctx, c[0], c[1], time.Now().Add(time.Hour)); err != nil {
			s.progress("pausing the refreshers for the final count failed (%v); the counts may be off by the refreshes in flight", err)
			return
		}
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(30 * time.Second)
wait:
	for {
		settled := true
		for _, c := range consumers {
			cons, err := s.js.Consumer(ctx, c[0], c[1])
			if err != nil {
				settled = false
				break
			}
			if ci, err := cons.Info(ctx); err != nil || ci.NumAckPending != 0 {
				settled = false
				break
			}
		}
		if settled {
			break
		}
		select {
		case <-tick.C:
		case <-deadline:
			break wait
		case <-ctx.Done():
			break wait
		}
	}
	// Announcements are published before the ack: a round trip on the
	// runtimes' connection receives what is on its way.
	_ = s.nc.Flush()
}

// lostSchedules counts the active credentials with neither a pending
// schedule nor a fired auth.expiring in the schedules or events stream. A
// credential can be between the two for an instant (its refresh acked, the
// next schedule's publish not yet stored): those found missing are looked
// at again a moment later.
func (s *soak) lostSchedules(ctx context.Context) int {
	covered := func() map[string]bool {
		out := map[string]bool{}
		for _, at := range []struct {
			stream  string
			filters []string
		}{
			{s.subj.SchedulesStream(), []string{s.subj.ScheduleWildcard(), s.subj.DueWildcard(events.TypeExpiring)}},
			{s.subj.EventsStream(), []string{s.subj.LegacyScheduleWildcard(), s.subj.WorkWildcard(events.TypeExpiring), s.subj.SlowWildcard(events.TypeExpiring)}},
		} {
			stream, err := s.js.Stream(ctx, at.stream)
			if err != nil {
				return nil
			}
			for _, filter := range at.filters {
				info, err := stream.Info(ctx, jetstream.WithSubjectFilter(filter))
				if err != nil {
					return nil
				}
				for subject := range info.State.Subjects {
					_, k, err := s.subj.ParseWork(subject)
					if err != nil {
						_, k, err = s.subj.Parse(subject) // a schedule
					}
					if err == nil {
						out[k.String()] = true
					}
				}
			}
		}
		return out
	}
	missing := func(have map[string]bool, among []int) []int {
		var out []int
		s.stats.mu.Lock()
		defer s.stats.mu.Unlock()
		for _, i := range among {
			if !s.stats.cur[i].reauth && !have[s.keys[i].String()] {
				out = append(out, i)
			}
		}
		return out
	}
	all := make([]int, len(s.keys))
	for i := range all {
		all[i] = i
	}
	first := covered()
	if first == nil {
		return -1 // could not look: not a count
	}
	candidates := missing(first, all)
	if len(candidates) > 0 {
		select {
		case <-time.After(2 * time.Second):
		case <-ctx.Done():
		}
		candidates = missing(covered(), candidates)
	}
	return len(candidates)
}

// WriteTable writes the report as the table docs/performance.md shows.
func (r *Report) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(name, format string, args ...any) {
		fmt.Fprintf(tw, "%s\t%s\n", name, fmt.Sprintf(format, args...))
	}
	row("credentials × token lifetime", "%d × %gs, for %s", r.Credentials, r.LifetimeSeconds, (time.Duration(r.DurationSeconds) * time.Second).Round(time.Second))
	row("refreshers", "%s (workers: %s), refresh lead %s", r.Refreshers, orDefault(r.Workers), r.RefreshLead)
	row("runtime uses", "%.0f/s asked", r.UsesPerSecond)
	if r.Outage != "" {
		row("outage", "%s", r.Outage)
	}
	row("refresher kills", "%d (%s)", r.Kills, r.KilledHow)
	row("registration", "%.1fs", r.Registration)
	row("generations (new tokens)", "%d (%.1f/s)", r.Generations, r.RotationsPerSec)
	row("calls per generation min/mean/max", "%.2f/%.2f/%.2f", r.CallsPerGeneration.Min, r.CallsPerGeneration.Mean, r.CallsPerGeneration.Max)
	row("token calls (failed)", "%d (%d)", r.TokenCalls, r.FailedCalls)
	row("refresh-token reuses", "%d", r.Reuses)
	row("needs_reauth", "%d", r.NeedsReauth)
	if r.Outage != "" {
		row("token calls during the outage", "%d: %d opened the breakers (%d openings), %d probes at most (%d half-opens, %.2f per refresher per 30s)",
			r.OutageCalls, r.OutageCalls-min(r.OutageCalls, r.HalfOpens), r.BreakerOpens, min(r.OutageCalls, r.HalfOpens), r.HalfOpens, r.ProbesPerInterval)
	}
	for _, p := range r.Phases {
		row("uses / expired handed out / 401s, "+p.Phase, "%d / %d / %d", p.Uses, p.Expired, p.Unauthorized)
	}
	row("auth.token errors; auth.401 published", "%d; %d", r.TokenErrors, r.Reported401)
	row("refresh margin before expiry min/p1/p50", "%.1f/%.1f/%.1fs (%d refreshed after expiry)", r.Margin.Min, r.Margin.P1, r.Margin.P50, r.Late)
	row("schedule lag p50/p99/max", "%.2f/%.2f/%.2fs (%d scheduled refreshes)", r.Lag.P50, r.Lag.P99, r.Lag.Max, r.Lag.N)
	row("lost schedules at the end", "%d", r.LostSchedules)
	row("expired tokens at the end", "%d", r.Expired)
	for _, u := range r.Usage {
		row("CPU, peak RSS: "+u.Name, "%.1fs (%.0f %% of a core), %.0f MiB, %d incarnation(s)", u.CPUSeconds, u.CPUPercent, u.PeakRSSMiB, u.Incarnations)
	}
	var outs []string
	for _, k := range slices.Sorted(maps.Keys(r.Outcomes)) {
		outs = append(outs, fmt.Sprintf("%s %d", k, r.Outcomes[k]))
	}
	row("refresher outcomes", "%s", strings.Join(outs, ", "))
	row("refresher warnings", "%d", r.Warnings)
	return tw.Flush()
}

func orDefault(n int) string {
	if n == 0 {
		return "default"
	}
	return fmt.Sprint(n)
}
