package workers

import (
	"context"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// dispatcher hands events to the pool's workers, fairly among tenants:
//
//   - the work lane first, the slow lane (a tenant's flood) only when the
//     work lane has nothing waiting (see intake.go);
//   - a tenant runs at most Config.TenantWorkers refreshes at once, so
//     that a tenant whose token endpoint hangs cannot take every worker:
//     the others stay free for every other tenant. Its further events wait
//     in this process, without a worker, and start as its refreshes end,
//     tenants with waiting events taking turns; they are reported in
//     progress meanwhile, so JetStream does not redeliver them. How many
//     may wait follows how fast the tenant's refreshes end (see
//     waitingLimit); the rest go back to the stream for a while.
//
// It runs in Run's goroutine; only done is written from elsewhere.
type dispatcher struct {
	p        *Pool
	ctx      context.Context // ends the intake of new events (shutdown)
	work     context.Context // what refreshes run on: it outlives ctx
	free     int             // workers without a refresh
	running  map[string]int  // refreshes per tenant
	waiting  map[string][]waiting
	turns    []string // tenants with waiting events, in the order they take turns
	paces    map[string]*pace
	done     chan string
	inflight int
}

// waiting is an event held back because its tenant runs as many refreshes
// as it may.
type waiting struct {
	msg   jetstream.Msg
	since time.Time
}

// waitingLimit is how many events tenant may have waiting in this process;
// beyond it they go back to the stream for a while. It is as many as its
// refreshes ended here in about the last second, so that an event waits
// about a second at most, at least twice the worker count, and at most 128
// times. A tenant whose refreshes hang keeps the least: its events are not
// hoarded by a process that cannot start them. One whose refreshes end
// within milliseconds keeps its backlog: waiting here costs nothing, while
// each trip back to the stream is a redelivery and a delay. With a flat
// twice the worker count, a 600-event backlog of one tenant went back to
// the stream 655–796 times, 292–435 of its events more than once; with
// this, 0–115 times, none more than once
// (TestOneTenantsBacklogWaitsWhileItsRefreshesEnd).
func (d *dispatcher) waitingLimit(tenant string, now time.Time) int {
	least := 2 * d.p.cfg.Workers
	n := 0
	if pc := d.paces[tenant]; pc != nil {
		n = pc.perSecond(now)
	}
	return min(max(least, n), 128*d.p.cfg.Workers)
}

// busyDelay is how long an event whose tenant had no room in this process
// waits before it is delivered again: short at first, since a tenant's
// refreshes usually end within milliseconds, then doubling with each
// delivery up to LeaseWait, so that a tenant whose refreshes hang costs a
// delivery per LeaseWait, and a long backlog does not use up MaxDeliver
// in a second. A flat LeaseWait (1s) left a 500-event storm of one tenant
// waiting a second for most of it: its backlog drained at half the speed.
func (p *Pool) busyDelay(attempt uint64) time.Duration {
	return min(busyDelayFirst<<min(max(attempt, 1)-1, 10), p.cfg.LeaseWait)
}

// busyDelayFirst is busyDelay's first delay: a few refreshes' time.
const busyDelayFirst = 25 * time.Millisecond

func newDispatcher(p *Pool, ctx, work context.Context) *dispatcher {
	return &dispatcher{p: p, ctx: ctx, work: work, free: p.cfg.Workers,
		running: map[string]int{}, waiting: map[string][]waiting{}, paces: map[string]*pace{},
		done: make(chan string, p.cfg.Workers)}
}

// run dispatches the events of both lanes until both are closed (Run
// stopped the intake) and every refresh has ended.
func (d *dispatcher) run(workLane, slowLane <-chan jetstream.Msg) {
	progress := time.NewTicker(d.p.cfg.progressEvery())
	defer progress.Stop()
	for workLane != nil || slowLane != nil || d.inflight > 0 {
		d.startWaiting()
		var wl, sl <-chan jetstream.Msg
		if d.free > 0 {
			wl, sl = workLane, slowLane
		}
		if wl != nil {
			// The work lane first, whenever it has an event.
			select {
			case msg, ok := <-wl:
				if !ok {
					workLane = nil
				} else {
					d.take(msg)
				}
				continue
			default:
			}
		}
		select {
		case tenant := <-d.done:
			d.finish(tenant)
		case msg, ok := <-wl:
			if !ok {
				workLane = nil
				continue
			}
			d.take(msg)
		case msg, ok := <-sl:
			if !ok {
				slowLane = nil
				continue
			}
			d.take(msg)
		case <-progress.C:
			d.progress()
		}
	}
	// Lanes closed: what still waits goes back for another refresher.
	for _, ws := range d.waiting {
		for _, w := range ws {
			_ = w.msg.Nak()
		}
	}
}

// take starts msg now, or holds it back while its tenant runs as many
// refreshes as it may.
func (d *dispatcher) take(msg jetstream.Msg) {
	if d.ctx.Err() != nil {
		// Fetched but not started: let another refresher have it now.
		_ = msg.Nak()
		return
	}
	tenant := tenantOf(msg.Subject())
	if d.running[tenant] < d.p.cfg.TenantWorkers {
		d.start(tenant, msg)
		return
	}
	if len(d.waiting[tenant]) >= d.waitingLimit(tenant, time.Now()) {
		attempt := attemptOf(msg)
		d.p.settle(d.work, msg, resultOf(outTenantBusy, jitter(d.p.busyDelay(attempt)), "its tenant has as many events waiting in this refresher as it may"), attempt, time.Now())
		return
	}
	if len(d.waiting[tenant]) == 0 {
		d.turns = append(d.turns, tenant)
	}
	d.waiting[tenant] = append(d.waiting[tenant], waiting{msg: msg, since: time.Now()})
}

// startWaiting starts held-back events while workers are free, one per
// tenant in turn, skipping tenants still at their limit.
func (d *dispatcher) startWaiting() {
	for n := len(d.turns); d.free > 0 && n > 0; n-- {
		tenant := d.turns[0]
		d.turns = d.turns[1:]
		if d.running[tenant] >= d.p.cfg.TenantWorkers {
			d.turns = append(d.turns, tenant)
			continue
		}
		ws := d.waiting[tenant]
		d.start(tenant, ws[0].msg)
		if ws = ws[1:]; len(ws) > 0 {
			d.waiting[tenant] = ws
			d.turns = append(d.turns, tenant)
		} else {
			delete(d.waiting, tenant)
		}
	}
}

func (d *dispatcher) start(tenant string, msg jetstream.Msg) {
	d.free--
	d.inflight++
	d.running[tenant]++
	d.p.handlers.Go(func() {
		defer func() { d.done <- tenant }()
		d.p.handle(d.work, msg)
	})
}

func (d *dispatcher) finish(tenant string) {
	d.free++
	d.inflight--
	if d.running[tenant]--; d.running[tenant] <= 0 {
		delete(d.running, tenant)
	}
	pc := d.paces[tenant]
	if pc == nil {
		pc = &pace{}
		d.paces[tenant] = pc
	}
	pc.ended(time.Now())
}

// progress tells JetStream that events held back for a while are still
// being worked on, and forgets the paces of tenants idle here.
func (d *dispatcher) progress() {
	now := time.Now()
	for tenant, pc := range d.paces {
		if pc.perSecond(now) == 0 && d.running[tenant] == 0 {
			delete(d.paces, tenant)
		}
	}
	limit := d.p.cfg.progressEvery()
	for _, ws := range d.waiting {
		for _, w := range ws {
			if time.Since(w.since) >= limit {
				_ = w.msg.InProgress()
			}
		}
	}
}

// pace counts the ends of one tenant's refreshes in this process, in
// one-second buckets: the current second and the one before it. In the
// first second it knows the tenant, it extrapolates from what ended so
// far: a backlog is read within milliseconds, long before a second of ends
// could be counted.
type pace struct {
	first     time.Time // of the first end counted
	young     int       // ends within a second of first
	second    int64     // the Unix second cur counts
	cur, prev int
}

// paceFloor is the shortest time pace extrapolates from.
const paceFloor = 10 * time.Millisecond

// ended counts one end at now.
func (pc *pace) ended(now time.Time) {
	if pc.first.IsZero() {
		pc.first = now
	}
	if now.Sub(pc.first) < time.Second {
		pc.young++
	}
	s := now.Unix()
	switch s {
	case pc.second:
	case pc.second + 1:
		pc.prev, pc.cur = pc.cur, 0
	default:
		pc.prev, pc.cur = 0, 0
	}
	pc.second = s
	pc.cur++
}

// perSecond is about how many ended in the second before now: all of the
// current bucket and the part of the previous one still inside it.
func (pc *pace) perSecond(now time.Time) int {
	if pc.first.IsZero() {
		return 0
	}
	if age := now.Sub(pc.first); age < time.Second {
		return int(float64(pc.young) * float64(time.Second) / float64(max(age, paceFloor)))
	}
	left := 1 - float64(now.Nanosecond())/1e9 // of the bucket before now's
	switch now.Unix() {
	case pc.second:
		return pc.cur + int(float64(pc.prev)*left)
	case pc.second + 1:
		return int(float64(pc.cur) * left)
	}
	return 0
}

// tenantOf is the tenant of a work or slow lane subject
// (<prefix>.<lane>.<word>.<tenant>.<user>.<server>): the fourth token from
// the end. A subject too short to have one is its own tenant (the refresh
// refuses it as bad input).
func tenantOf(subject string) string {
	parts := strings.Split(subject, ".")
	if len(parts) < 3 {
		return subject
	}
	return parts[len(parts)-3]
}

// attemptOf is msg's delivery count, 1 when its metadata cannot be read.
func attemptOf(msg jetstream.Msg) uint64 {
	if md, err := msg.Metadata(); err == nil {
		return md.NumDelivered
	}
	return 1
}
