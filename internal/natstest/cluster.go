package natstest

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// Restart shuts s down and starts a new server with the options RunServer
// uses, on the same client port and the same JetStream store, as when the
// NATS server of a deployment restarts. Clients connected with reconnects
// on (Connect's default) come back by themselves. The new server is shut
// down when the test ends.
func Restart(t testing.TB, s *server.Server) *server.Server {
	t.Helper()
	port := s.Addr().(*net.TCPAddr).Port
	// StoreDir is the store's "jetstream" folder; the option is its parent.
	storeDir := filepath.Dir(s.StoreDir())
	s.Shutdown()
	s.WaitForShutdown()
	opts := &server.Options{
		ServerName: "natstest",
		Host:       "127.0.0.1",
		Port:       port,
		JetStream:  true,
		StoreDir:   storeDir,
		NoLog:      true,
		NoSigs:     true,
	}
	return start(t, opts)
}

func start(t testing.TB, opts *server.Options) *server.Server {
	t.Helper()
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("natstest: new server %s: %v", opts.ServerName, err)
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		t.Fatalf("natstest: server %s not ready for connections within 10s", opts.ServerName)
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

// Cluster is a JetStream cluster of servers running inside the test
// process, each with its own store, joined by routes on loopback: the way
// failover is tested. Its methods are safe for concurrent use.
type Cluster struct {
	t       testing.TB
	proxies *routeProxies // every route goes through them (see Lag)
	mu      sync.Mutex
	srvs    []*server.Server // nil while stopped
	opts    []*server.Options
}

// ClusterOption changes the options of every server of a cluster before it
// starts.
type ClusterOption func(*server.Options)

// SyncAlways makes every server sync its store to disk on every write, as
// the authbus deployments do (jetstream sync_interval: always).
func SyncAlways() ClusterOption { return func(o *server.Options) { o.SyncAlways = true } }

// RunCluster starts an n-node JetStream cluster and waits until it has a
// meta leader. Every server is shut down when the test ends.
func RunCluster(t testing.TB, n int, opts ...ClusterOption) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("natstest: cluster of %d servers", n)
	}
	clusterPorts := freePorts(t, n)
	c := &Cluster{t: t, srvs: make([]*server.Server, n), opts: make([]*server.Options, n)}
	var routes [][]string
	c.proxies, routes = newRouteProxies(t, clusterPorts)
	for i := range n {
		c.opts[i] = &server.Options{
			ServerName: fmt.Sprintf("n%d", i),
			Host:       "127.0.0.1",
			Port:       server.RANDOM_PORT,
			JetStream:  true,
			StoreDir:   t.TempDir(),
			NoLog:      true,
			NoSigs:     true,
			Cluster: server.ClusterOpts{
				Name: "natstest",
				Host: "127.0.0.1",
				Port: clusterPorts[i],
				// Every route must go through the proxies (see Lag):
				// an address nobody listens on keeps peers that hear of
				// this node by gossip from dialing it directly.
				Advertise: "127.0.0.1:1",
			},
			Routes: server.RoutesFromStr(strings.Join(routes[i], ",")),
		}
		for _, o := range opts {
			o(c.opts[i])
		}
	}
	// Servers wait for their peers before JetStream is ready, so start them
	// all before waiting on any.
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			s, err := server.NewServer(c.opts[i])
			if err != nil {
				t.Errorf("natstest: new server n%d: %v", i, err)
				return
			}
			s.Start()
			c.mu.Lock()
			c.srvs[i] = s
			c.mu.Unlock()
		})
	}
	wg.Wait()
	t.Cleanup(c.shutdownAll)
	for i, s := range c.srvs {
		if s == nil || !s.ReadyForConnections(10*time.Second) {
			t.Fatalf("natstest: cluster server n%d not ready within 10s", i)
		}
		// Restarts must come back on the same client port.
		c.opts[i].Port = s.Addr().(*net.TCPAddr).Port
	}
	c.WaitMetaLeader()
	return c
}

func (c *Cluster) shutdownAll() {
	c.mu.Lock()
	srvs := append([]*server.Server(nil), c.srvs...)
	c.mu.Unlock()
	for _, s := range srvs {
		if s != nil {
			s.Shutdown()
			s.WaitForShutdown()
		}
	}
}

// Servers returns the running servers; a stopped one is nil.
func (c *Cluster) Servers() []*server.Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*server.Server(nil), c.srvs...)
}

// URLs returns the client URLs of every server, running or not, comma
// separated, for nats.Connect.
func (c *Cluster) URLs() string {
	var urls []string
	for _, o := range c.opts {
		urls = append(urls, fmt.Sprintf("nats://127.0.0.1:%d", o.Port))
	}
	return strings.Join(urls, ",")
}

// Connect opens a connection that knows every server of the cluster and
// reconnects forever; it is closed when the test ends.
func (c *Cluster) Connect(t testing.TB, opts ...nats.Option) *nats.Conn {
	t.Helper()
	opts = append([]nats.Option{
		nats.Name(t.Name()), nats.MaxReconnects(-1),
		nats.ReconnectWait(50 * time.Millisecond), nats.DontRandomize(),
	}, opts...)
	nc, err := nats.Connect(c.URLs(), opts...)
	if err != nil {
		t.Fatalf("natstest: connect to cluster: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// ClientURL returns the client URL of server i, running or not.
func (c *Cluster) ClientURL(i int) string { return fmt.Sprintf("nats://127.0.0.1:%d", c.opts[i].Port) }

// ConnectTo opens a connection to server i only (it neither fails over
// nor follows the servers the cluster announces), as a process that runs
// beside that node and talks to it alone; it is closed when the test ends.
func (c *Cluster) ConnectTo(t testing.TB, i int, opts ...nats.Option) *nats.Conn {
	t.Helper()
	opts = append([]nats.Option{nats.Name(fmt.Sprintf("%s@n%d", t.Name(), i)), nats.IgnoreDiscoveredServers(),
		nats.MaxReconnects(-1), nats.ReconnectWait(50 * time.Millisecond)}, opts...)
	nc, err := nats.Connect(c.ClientURL(i), opts...)
	if err != nil {
		t.Fatalf("natstest: connect to n%d: %v", i, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// Stop shuts server i down, as a crash of its node would.
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	s := c.srvs[i]
	c.srvs[i] = nil
	c.mu.Unlock()
	if s != nil {
		s.Shutdown()
		s.WaitForShutdown()
	}
}

// Restart starts a stopped server i again with its store and ports.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	s, err := server.NewServer(c.opts[i])
	if err != nil {
		c.t.Fatalf("natstest: restart n%d: %v", i, err)
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		c.t.Fatalf("natstest: restarted n%d not ready within 10s", i)
	}
	c.mu.Lock()
	c.srvs[i] = s
	c.mu.Unlock()
}

// WaitMetaLeader waits until the running servers agree on a JetStream meta
// leader, or fails the test after 20s.
func (c *Cluster) WaitMetaLeader() {
	c.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for time.Now().Before(deadline) {
		for _, s := range c.Servers() {
			if s != nil && s.JetStreamIsLeader() {
				return
			}
		}
		<-tick.C
	}
	c.t.Fatal("natstest: no JetStream meta leader within 20s")
}

// MetaLeader returns the index of the server that is the JetStream meta
// leader, or -1 when none is right now.
func (c *Cluster) MetaLeader() int {
	for i, s := range c.Servers() {
		if s != nil && s.JetStreamIsLeader() {
			return i
		}
	}
	return -1
}

// StreamLeader returns the index of the server that leads stream in the
// global account, or -1 when none does right now.
func (c *Cluster) StreamLeader(stream string) int {
	for i, s := range c.Servers() {
		if s != nil && s.JetStreamIsStreamLeader(server.DEFAULT_GLOBAL_ACCOUNT, stream) {
			return i
		}
	}
	return -1
}

// WaitCurrent waits until every running server has caught up with each of
// the streams (in the global account) and holds the same last message, or
// fails the test after 30s. Shutting a server down while it still restores a
// stream leaks that stream's goroutines in nats-server, so tests end with
// this.
//
// nats-server's own "current" only says a follower applied what it knows
// is committed; a follower that has not yet heard of the leader's newest
// commit is current by that test but would still answer a direct get with
// "not found". So the last sequences are compared too.
func (c *Cluster) WaitCurrent(streams ...string) {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		current := true
		last := make(map[string]uint64, len(streams))
		for _, s := range c.Servers() {
			if s == nil {
				continue
			}
			seqs := lastSeqs(s)
			for _, st := range streams {
				if !s.JetStreamIsStreamCurrent(server.DEFAULT_GLOBAL_ACCOUNT, st) {
					current = false
				}
				seq, ok := seqs[st]
				if prev, seen := last[st]; !ok || (seen && prev != seq) {
					current = false
				}
				last[st] = seq
			}
		}
		if current {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("natstest: streams %v not current on every server within 30s", streams)
		}
		<-tick.C
	}
}

// lastSeqs returns the last sequence of each stream of the global account
// as s holds it.
func lastSeqs(s *server.Server) map[string]uint64 {
	d, err := s.JszAccount(&server.JSzOptions{Account: server.DEFAULT_GLOBAL_ACCOUNT, Streams: true})
	if err != nil {
		return nil
	}
	seqs := make(map[string]uint64, len(d.Streams))
	for _, st := range d.Streams {
		seqs[st.Name] = st.State.LastSeq
	}
	return seqs
}

// MoveLeader asks the leader of stream (in the global account) to step
// down, as an operator's "nats stream cluster step-down" does, and waits
// until another running server leads it; it returns that server's index.
// nc is any connection to the cluster.
func (c *Cluster) MoveLeader(nc *nats.Conn, stream string) int {
	c.t.Helper()
	old := c.StreamLeader(stream)
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	asked := false
	for time.Now().Before(deadline) {
		if !asked {
			// The API answers once the stepdown is under way; during an
			// election it may not answer at all, so ask until it does.
			if _, err := nc.Request("$JS.API.STREAM.LEADER.STEPDOWN."+stream, nil, 2*time.Second); err == nil {
				asked = true
			}
		}
		if i := c.StreamLeader(stream); asked && i >= 0 && i != old {
			return i
		}
		<-tick.C
	}
	c.t.Fatalf("natstest: the leader of %s (n%d) did not move within 30s", stream, old)
	return -1
}

// freePorts returns n TCP ports that were free a moment ago.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("natstest: free port: %v", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}
