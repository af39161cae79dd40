package workers

import (
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// lanes serve the requests of one service endpoint concurrently, each
// tenant in a lane of its own. NATS micro hands an endpoint's requests
// over one at a time, so a registration waiting 5 s for a slow issuer held
// up every other tenant's; here a request is served at once when its
// tenant and the refresher have a free slot, else it waits in its
// tenant's lane, and free slots go round the tenants that wait in turn.
// A tenant holds at most perTenant slots and waiting places; beyond them,
// or beyond the totals, a request is answered 503 unavailable at once,
// telling the client to retry. The goroutines serving requests are owned
// by wg: Run waits for them. Safe for concurrent use.
type lanes struct {
	what      string // the endpoint, for messages
	total     int    // requests served at once
	perTenant int    // requests of one tenant served at once
	wait      int    // requests of one tenant waiting
	waitTotal int    // requests waiting
	maxWait   time.Duration
	wg        *sync.WaitGroup

	mu      sync.Mutex
	closed  bool // no more requests are taken: wg may be waited for
	running int
	waiting int
	tenants map[string]*lane // tenants with requests running or waiting
	turn    []string         // tenants with requests waiting, in turn order
}

type lane struct {
	running int
	queue   []job
}

type job struct {
	serve    func()
	refuse   func(description string)
	received time.Time
}

func newLanes(what string, total, perTenant, wait int, wg *sync.WaitGroup) *lanes {
	return &lanes{what: what, total: total, perTenant: perTenant, wait: wait, waitTotal: wait * max(4, total/perTenant),
		maxWait: requestTimeout, wg: wg, tenants: map[string]*lane{}}
}

// submit serves j for tenant now, queues it, or refuses it (503).
func (l *lanes) submit(tenant string, j job) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		j.refuse("this refresher is shutting down; retry, another refresher will answer")
		return
	}
	ln := l.tenants[tenant]
	if ln == nil {
		ln = &lane{}
		l.tenants[tenant] = ln
	}
	switch {
	case ln.running < l.perTenant && l.running < l.total && len(ln.queue) == 0:
		ln.running++
		l.running++
		l.wg.Add(1)
		go l.serve(tenant, j)
	case len(ln.queue) < l.wait && l.waiting < l.waitTotal:
		if len(ln.queue) == 0 {
			l.turn = append(l.turn, tenant)
		}
		ln.queue = append(ln.queue, j)
		l.waiting++
	default:
		busy := fmt.Sprintf("this refresher serves %d %s requests of tenant %q at once and has %d waiting", ln.running, l.what, tenant, len(ln.queue))
		if ln.running < l.perTenant {
			busy = fmt.Sprintf("this refresher has %d %s requests in progress and %d waiting", l.running, l.what, l.waiting)
		}
		if ln.running == 0 && len(ln.queue) == 0 {
			delete(l.tenants, tenant)
		}
		l.mu.Unlock()
		j.refuse(busy + "; retry shortly (another refresher may answer)")
		return
	}
	l.mu.Unlock()
}

// close stops taking requests; those taken are still served. After it
// returns, wg only counts down.
func (l *lanes) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
}

// serve runs j, then the next waiting request whose turn it is, until
// none can be served.
func (l *lanes) serve(tenant string, j job) {
	defer l.wg.Done()
	for {
		if waited := time.Since(j.received); waited > l.maxWait {
			j.refuse(fmt.Sprintf("the request waited %v for its turn, longer than a requester waits; retry", waited.Round(time.Millisecond)))
		} else {
			j.serve()
		}
		l.mu.Lock()
		ln := l.tenants[tenant]
		ln.running--
		l.running--
		if ln.running == 0 && len(ln.queue) == 0 {
			delete(l.tenants, tenant)
		}
		var ok bool
		tenant, j, ok = l.nextLocked()
		l.mu.Unlock()
		if !ok {
			return
		}
	}
}

// nextLocked takes the first waiting request, in turn order, whose tenant
// has a free slot, and counts it as running.
func (l *lanes) nextLocked() (string, job, bool) {
	if l.running >= l.total {
		return "", job{}, false
	}
	for i, tenant := range l.turn {
		ln := l.tenants[tenant]
		if ln.running >= l.perTenant {
			continue
		}
		j := ln.queue[0]
		ln.queue = ln.queue[1:]
		l.waiting--
		// This tenant's turn is over: to the back of the line if it still
		// waits, out of it if not.
		l.turn = append(l.turn[:i], l.turn[i+1:]...)
		if len(ln.queue) > 0 {
			l.turn = append(l.turn, tenant)
		}
		ln.running++
		l.running++
		return tenant, j, true
	}
	return "", job{}, false
}

// detachedRequest is a service request served after its micro handler
// returned. micro reads a request's reply error once the handler returns,
// so a request answered later on another goroutine must not be micro's
// own: this one holds a copy of what the handler needs and answers the
// same way, with nc.
type detachedRequest struct {
	nc      *nats.Conn
	subject string
	reply   string
	data    []byte
	headers micro.Headers
}

func detach(nc *nats.Conn, req micro.Request) *detachedRequest {
	return &detachedRequest{nc: nc, subject: req.Subject(), reply: req.Reply(), data: req.Data(), headers: req.Headers()}
}

func (r *detachedRequest) Respond(data []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{Subject: r.reply, Data: data}
	for _, o := range opts {
		o(m)
	}
	if err := r.nc.PublishMsg(m); err != nil {
		return fmt.Errorf("%w: %w", micro.ErrRespond, err)
	}
	return nil
}

func (r *detachedRequest) RespondJSON(v any, opts ...micro.RespondOpt) error {
	data, err := json.Marshal(v)
	if err != nil {
		return micro.ErrMarshalResponse
	}
	return r.Respond(data, opts...)
}

func (r *detachedRequest) Error(code, description string, data []byte, opts ...micro.RespondOpt) error {
	if code == "" || description == "" {
		return fmt.Errorf("%w: error code and description", micro.ErrArgRequired)
	}
	h := nats.Header{micro.ErrorHeader: {description}, micro.ErrorCodeHeader: {code}}
	return r.Respond(data, append([]micro.RespondOpt{func(m *nats.Msg) { m.Header = h }}, opts...)...)
}

func (r *detachedRequest) Data() []byte           { return r.data }
func (r *detachedRequest) Headers() micro.Headers { return r.headers }
func (r *detachedRequest) Subject() string        { return r.subject }
func (r *detachedRequest) Reply() string          { return r.reply }
