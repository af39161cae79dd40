package natstest

import (
	"bytes"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// routeProxies carry every route connection of a Cluster, so that a test
// can make one node lag (Cluster.Lag): the replication traffic on its way
// to it is held back for a while, as a follower whose process is starved
// of CPU or whose disk is slow applies what its leader sent late. Its
// clients are still answered at once, from what it has: a direct get it
// answers returns an older revision than the leader acknowledged. That is
// the fault a read fence must survive; killing a leader does not produce
// it.
//
// Replication is the Raft traffic, which nats-server sends in the system
// account, on a route connection of its own (the system account is pinned
// to a dedicated route by default); the dialer of such a route names the
// account in its INFO, which is how a proxied connection is recognised.
//
// There is one listener per ordered pair of nodes (from, to): node from's
// route to node to dials it, so each connection knows both of its ends.
type routeProxies struct {
	t       testing.TB
	lag     []atomic.Int64 // per node: how long bytes on their way to it are held back, in ns
	targets []string       // per node: its real cluster listen address

	mu    sync.Mutex
	lns   []net.Listener
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
	done  chan struct{}
}

func newRouteProxies(t testing.TB, clusterPorts []int) (*routeProxies, [][]string) {
	t.Helper()
	n := len(clusterPorts)
	p := &routeProxies{t: t, lag: make([]atomic.Int64, n), targets: make([]string, n),
		conns: map[net.Conn]struct{}{}, done: make(chan struct{})}
	for i, port := range clusterPorts {
		p.targets[i] = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	}
	routes := make([][]string, n) // routes[from]: the route URLs node from dials
	for from := range n {
		for to := range n {
			if from == to {
				continue
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatalf("natstest: route proxy listener: %v", err)
			}
			p.lns = append(p.lns, ln)
			routes[from] = append(routes[from], "nats-route://"+ln.Addr().String())
			p.wg.Go(func() { p.accept(ln, from, to) })
		}
	}
	t.Cleanup(p.close)
	return p, routes
}

func (p *routeProxies) accept(ln net.Listener, from, to int) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", p.targets[to])
		if err != nil {
			c.Close() // the node is stopped: the dialer retries
			continue
		}
		if !p.track(c, up) {
			return
		}
		repl := new(atomic.Bool)                             // a system-account (replication) route
		p.wg.Go(func() { p.pipe(c, up, to, repl, true) })    // from's bytes, on their way to node to
		p.wg.Go(func() { p.pipe(up, c, from, repl, false) }) // to's answers, on their way to node from
	}
}

// track registers a connection pair, or closes it when the proxies are
// closing.
func (p *routeProxies) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		for _, c := range cs {
			c.Close()
		}
		return false
	default:
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

// chunk is a read from one side, with when it was read.
type chunk struct {
	data []byte
	at   time.Time
}

// systemRoute is what the dialer of a route dedicated to the system
// account sends in its INFO.
var systemRoute = []byte(`"route_account":"$SYS"`)

// pipe copies src to dst. On a replication route it holds every chunk back
// until it is as old as the lag of node toward (read at the moment it
// would be written, so a lag set or lifted takes effect at once). Order is
// kept. Either side closing closes both. The dialer's side (sniff) tells
// whether the route is a replication route.
func (p *routeProxies) pipe(src, dst net.Conn, toward int, repl *atomic.Bool, sniff bool) {
	defer src.Close()
	defer dst.Close()
	chunks := make(chan chunk, 1024)
	var wg sync.WaitGroup
	wg.Go(func() {
		defer close(chunks)
		var seen int
		for {
			buf := make([]byte, 32<<10)
			n, err := src.Read(buf)
			if sniff && seen < 16<<10 {
				// The INFO comes within the first few hundred bytes.
				if bytes.Contains(buf[:n], systemRoute) {
					repl.Store(true)
				}
				seen += n
			}
			if n > 0 {
				select {
				case chunks <- chunk{buf[:n], time.Now()}:
				case <-p.done:
					return
				}
			}
			if err != nil {
				return
			}
		}
	})
	defer wg.Wait()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for c := range chunks {
		for repl.Load() {
			wait := time.Until(c.at.Add(time.Duration(p.lag[toward].Load())))
			if wait <= 0 {
				break
			}
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-p.done:
				return
			}
		}
		if _, err := dst.Write(c.data); err != nil {
			src.Close() // ends the reader
			for range chunks {
			}
			return
		}
	}
}

func (p *routeProxies) close() {
	p.mu.Lock()
	select {
	case <-p.done:
		p.mu.Unlock()
		return
	default:
	}
	close(p.done)
	for _, ln := range p.lns {
		ln.Close()
	}
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// Lag holds back the replication traffic on its way to node i by d (0
// lifts it), as a node whose process is starved or whose disk is slow
// applies what its leaders send late: its stream replicas fall behind
// while its clients are still answered at once, from what it has. It is
// not a partition: nothing is dropped, and with d well under the Raft
// election timeout (seconds) no leader changes.
func (c *Cluster) Lag(i int, d time.Duration) {
	if c.proxies == nil {
		c.t.Fatal("natstest: Lag on a cluster without route proxies")
	}
	c.proxies.lag[i].Store(int64(d))
}
