package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/cmdtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
	"github.com/authbus/authbus/workers/egress"
)

// nodeFiles are the per-node NATS config files compose.yaml mounts, in
// node order.
var nodeFiles = []string{"nats/nats-1.conf", "nats/nats-2.conf", "nats/nats-3.conf"}

// natsPasswords are the variables the NATS config reads its passwords from;
// compose.yaml passes them to every node.
var natsPasswords = map[string]string{
	"AUTHBUS_PASSWORD_REFRESHER": "refresher-test-pw",
	"AUTHBUS_PASSWORD_SERVE":     "serve-test-pw",
	"AUTHBUS_PASSWORD_ACME":      "acme-test-pw",
	"AUTHBUS_PASSWORD_OPERATOR":  "operator-test-pw",
	"AUTHBUS_PASSWORD_STORM":     "storm-test-pw",
	"AUTHBUS_PASSWORD_ADMIN":     "admin-test-pw",
}

// natsUsers are the users of deploy/nats/accounts.conf by role, with the
// variable of each one's password.
var natsUsers = map[string]struct{ user, passwordEnv string }{
	"refresher": {"authbus-refresher", "AUTHBUS_PASSWORD_REFRESHER"},
	"serve":     {"authbus-serve", "AUTHBUS_PASSWORD_SERVE"},
	"acme":      {"acme-runtime", "AUTHBUS_PASSWORD_ACME"},
	"operator":  {"authbus-operator", "AUTHBUS_PASSWORD_OPERATOR"},
	"storm":     {"authbus-storm", "AUTHBUS_PASSWORD_STORM"},
	"admin":     {"admin", "AUTHBUS_PASSWORD_ADMIN"},
}

func setPasswords(t *testing.T) {
	for k, v := range natsPasswords {
		t.Setenv(k, v)
	}
}

// TestNATSConfigsParse loads every NATS config file with the server's own
// loader and checks that the three node files describe one cluster.
func TestNATSConfigsParse(t *testing.T) {
	setPasswords(t)
	files, err := filepath.Glob("nats/*.conf")
	if err != nil || len(files) == 0 {
		t.Fatalf("no NATS config files under deploy/nats: %v", err)
	}
	for _, f := range files {
		if _, err := server.ProcessConfigFile(f); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}

	t.Run("missing password variable", func(t *testing.T) {
		// An empty variable counts as set; only an absent one is an error.
		unsetEnv(t, "AUTHBUS_PASSWORD_ACME")
		if _, err := server.ProcessConfigFile(nodeFiles[0]); err == nil || !strings.Contains(err.Error(), "AUTHBUS_PASSWORD_ACME") {
			t.Errorf("config without AUTHBUS_PASSWORD_ACME: err %v, want one naming the variable", err)
		}
	})

	var names []string
	for i, f := range nodeFiles {
		o, err := server.ProcessConfigFile(f)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		want := fmt.Sprintf("nats-%d", i+1)
		names = append(names, o.ServerName)
		if o.ServerName != want {
			t.Errorf("%s: server_name %q, want %q (the compose service name)", f, o.ServerName, want)
		}
		if !o.JetStream || o.StoreDir != "/data/jetstream" {
			t.Errorf("%s: JetStream %v store %q, want on under /data (the compose volume)", f, o.JetStream, o.StoreDir)
		}
		if o.Port != 4222 || o.HTTPPort != 8222 || o.Cluster.Port != 6222 || o.Cluster.Name != "authbus" {
			t.Errorf("%s: ports client %d http %d cluster %d name %q, want 4222 8222 6222 authbus",
				f, o.Port, o.HTTPPort, o.Cluster.Port, o.Cluster.Name)
		}
		var hosts []string
		for _, r := range o.Routes {
			hosts = append(hosts, r.Hostname()+":"+r.Port())
		}
		slices.Sort(hosts)
		if !slices.Equal(hosts, []string{"nats-1:6222", "nats-2:6222", "nats-3:6222"}) {
			t.Errorf("%s: routes %v, want the three nodes' cluster ports", f, hosts)
		}
		users := map[string]*server.User{}
		for _, u := range o.Users {
			users[u.Username] = u
		}
		for role, nu := range natsUsers {
			if u := users[nu.user]; u == nil || u.Password != natsPasswords[nu.passwordEnv] {
				t.Errorf("%s: user %q (%s) missing or its password not read from $%s", f, nu.user, role, nu.passwordEnv)
			}
		}
		if acme := users[natsUsers["acme"].user]; acme != nil {
			for _, s := range append(acme.Permissions.Publish.Allow, acme.Permissions.Subscribe.Allow...) {
				if !strings.Contains(s, ".acme.") && !strings.HasPrefix(s, "_INBOX_acme.") {
					t.Errorf("%s: user acme may use %q, which is not one of its own subjects", f, s)
				}
			}
		}
	}
	if len(names) != 3 || names[0] == names[1] || names[1] == names[2] {
		t.Errorf("server names %v are not three distinct names", names)
	}
}

// unsetEnv removes a variable for the rest of the test; t.Setenv first so
// that the old value is restored afterwards.
func unsetEnv(t *testing.T, name string) {
	t.Helper()
	t.Setenv(name, "")
	if err := osUnsetenv(name); err != nil {
		t.Fatal(err)
	}
}

// cluster is the compose topology running in this process.
type cluster struct {
	servers []*server.Server
	urls    []string // client URLs, in node order
}

// startCluster starts the three nodes from the repository's config files,
// with the ports rewritten to free loopback ports and the store to a temporary
// directory, and waits until each answers its compose health check URL. Run
// with DEBUG_NATS=1 to see the servers' logs.
func startCluster(t *testing.T, healthPath string) *cluster {
	t.Helper()
	setPasswords(t)
	// A free port found here may be taken by another process before the
	// server binds it (the cluster ports must be known before any server
	// starts, as each one routes to the others): then try new ones.
	var c *cluster
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if c, err = tryStartCluster(t); err == nil {
			break
		}
		t.Logf("starting the cluster: %v; trying other ports", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.shutdown)
	// The compose health check: JetStream has a meta leader and this node
	// is current with it.
	for i, s := range c.servers {
		u := "http://" + s.MonitorAddr().String() + healthPath
		fleet.Eventually(t, 30*time.Second, fmt.Sprintf("%s answers %s with 200", nodeFiles[i], healthPath), func() bool {
			resp, err := http.Get(u)
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			_, _ = io.Copy(io.Discard, resp.Body)
			return resp.StatusCode == http.StatusOK
		})
	}
	return c
}

func tryStartCluster(t *testing.T) (*cluster, error) {
	clusterPorts := make([]int, len(nodeFiles))
	for i := range clusterPorts {
		clusterPorts[i] = cmdtest.FreePort(t)
	}
	c := &cluster{}
	for i, f := range nodeFiles {
		o, err := server.ProcessConfigFile(f)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		o.Host = "127.0.0.1"
		o.Port = server.RANDOM_PORT
		o.HTTPHost = "127.0.0.1"
		o.HTTPPort = server.RANDOM_PORT
		o.Cluster.Host = "127.0.0.1"
		o.Cluster.Port = clusterPorts[i]
		// Compose names the nodes by service name; here they are ports.
		for _, r := range o.Routes {
			n, err := strconv.Atoi(strings.TrimPrefix(r.Hostname(), "nats-"))
			if err != nil || n < 1 || n > len(nodeFiles) {
				t.Fatalf("%s: route %s does not name a node nats-1…nats-%d", f, r, len(nodeFiles))
			}
			r.Host = net.JoinHostPort("127.0.0.1", strconv.Itoa(clusterPorts[n-1]))
		}
		o.StoreDir = t.TempDir()
		o.NoSigs = true
		o.NoLog = os.Getenv("DEBUG_NATS") == ""
		// The config's lame-duck period is for rolling restarts, not tests.
		o.LameDuckDuration = 0
		s, err := server.NewServer(o)
		if err != nil {
			t.Fatalf("%s: new server: %v", f, err)
		}
		if os.Getenv("DEBUG_NATS") != "" {
			s.SetLoggerV2(tlog{t, o.ServerName}, false, false, false)
		}
		s.Start()
		c.servers = append(c.servers, s)
	}
	for i, s := range c.servers {
		if !s.ReadyForConnections(20 * time.Second) {
			c.shutdown()
			return nil, fmt.Errorf("%s not ready for connections within 20s", nodeFiles[i])
		}
		c.urls = append(c.urls, s.ClientURL())
	}
	return c, nil
}

// shutdown stops every node still running.
func (c *cluster) shutdown() {
	for _, s := range c.servers {
		s.Shutdown()
		s.WaitForShutdown()
	}
}

// connect connects as user to the node i, with the other nodes as fallbacks
// as the compose --nats-url lists them.
func (c *cluster) connect(t *testing.T, i int, role string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nu := natsUsers[role]
	var urls []string
	for j := range c.urls {
		urls = append(urls, c.urls[(i+j)%len(c.urls)])
	}
	user := nu.user
	opts = append([]nats.Option{nats.UserInfo(nu.user, natsPasswords[nu.passwordEnv])}, opts...)
	opts = append([]nats.Option{nats.Name(t.Name() + "/" + user), nats.MaxReconnects(-1), nats.DontRandomize(),
		nats.ReconnectWait(50 * time.Millisecond)}, opts...)
	nc, err := nats.Connect(strings.Join(urls, ","), opts...)
	if err != nil {
		t.Fatalf("connect as %s to node %d: %v", user, i+1, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// asyncErrors collects the asynchronous errors of a connection, where the
// server reports permission violations.
type asyncErrors struct {
	mu   sync.Mutex
	errs []error
}

func (a *asyncErrors) handler(_ *nats.Conn, _ *nats.Subscription, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.errs = append(a.errs, err)
}

// has reports whether an error mentioning all of parts arrived.
func (a *asyncErrors) has(parts ...string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, err := range a.errs {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(err.Error(), p)
		}
		if all {
			return true
		}
	}
	return false
}

// TestComposeTopology runs the compose deployment in one process: three
// clustered NATS servers from deploy/nats, three refreshers (each on its own
// node, --replicas 3, as user refresher), and tenant acme with its
// permissions. A credential registered by acme rotates on its 401, acme is
// refused everything of another tenant, and a rotation still works after the
// node holding the work queue's leader is stopped.
func TestComposeTopology(t *testing.T) {
	compose := loadCompose(t)
	healthPath := natsHealthPath(t, compose)
	replicas := refresherReplicas(t, compose)
	c := startCluster(t, healthPath)

	as := authtest.New(t)
	as.AddClient("demo", "demo-secret")
	ring, err := kv.NewKeyRing("k1", map[string][]byte{"k1": []byte("0123456789abcdef0123456789abcdef")})
	if err != nil {
		t.Fatal(err)
	}
	subj, _ := events.NewSubjects("")
	ctx := context.Background()
	var refresherNC []*nats.Conn
	for i := range c.servers {
		nc := c.connect(t, i, "refresher")
		refresherNC = append(refresherNC, nc)
		cfg := workers.Config{
			Replicas:     replicas,
			Instance:     fmt.Sprintf("refresher-%d", i+1),
			Seal:         ring,
			TokenTimeout: 5 * time.Second,
			LeaseWait:    100 * time.Millisecond,
			RetryBase:    50 * time.Millisecond,
			RetryMax:     time.Second,
			AckWait:      5 * time.Second,
			// The test's authorization server is on loopback; compose's Dex
			// is at a private address (--allow-private-token-hosts).
			TokenHosts: egress.Policy{AllowLoopback: true},
			Logger:     slog.New(slog.DiscardHandler),
			// As compose starts them: serving as the serving user.
			ServeConn: c.connect(t, i, "serve"),
		}
		// A refresher that starts while the new cluster still elects the
		// leaders of its replicated streams may time out; in compose its
		// restart policy starts it again, here the loop does.
		var p *workers.Pool
		fleet.Eventually(t, 60*time.Second, fmt.Sprintf("refresher %d starts as NATS user refresher", i+1), func() bool {
			var err error
			if p, err = workers.New(ctx, nc, cfg); err != nil {
				t.Logf("refresher %d: %v", i+1, err)
			}
			return err == nil
		})
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- p.Run(runCtx) }()
		t.Cleanup(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("refresher %d: Run: %v", i+1, err)
			}
		})
	}
	js, err := jetstream.New(refresherNC[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{subj.EventsStream(), subj.SchedulesStream(), subj.ReauthStream(), kv.BucketStream(subj.CredentialsBucket()), kv.BucketStream(subj.LeasesBucket())} {
		st, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
		if got := st.CachedInfo().Config.Replicas; got != replicas {
			t.Errorf("stream %s has %d replicas, want %d", name, got, replicas)
		}
	}

	// Tenant acme, on the third node, with its own inbox prefix.
	var acmeErrs asyncErrors
	acme := c.connect(t, 2, "acme", nats.CustomInboxPrefix("_INBOX_acme"), nats.ErrorHandler(acmeErrs.handler))
	key, _ := events.ParseKey("acme.alice.github")
	rotated := make(chan events.Rotated, 16)
	if _, err := acme.Subscribe(subj.Event(events.TypeRotated, key), func(m *nats.Msg) {
		ev, err := events.Decode(events.TypeRotated, key, m.Data)
		if err != nil {
			t.Errorf("malformed auth.rotated: %v", err)
			return
		}
		rotated <- *ev.Rotated
	}); err != nil {
		t.Fatal(err)
	}
	if err := acme.Flush(); err != nil {
		t.Fatal(err)
	}
	tok := as.Issue("demo")
	body, _ := json.Marshal(events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: tok.AccessToken, TokenType: tok.TokenType, RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn},
		TokenEndpoint: as.TokenURL(), ClientID: "demo", ClientSecret: "demo-secret",
	})
	msg, err := acme.Request(subj.Register(key), body, 10*time.Second)
	if err != nil {
		t.Fatalf("acme registers %s: %v", key, err)
	}
	if code := msg.Header.Get("Nats-Service-Error-Code"); code != "" {
		t.Fatalf("register %s: %s %s", key, code, msg.Data)
	}
	waitRotated(t, rotated, 1)

	acmeJS, err := jetstream.New(acme)
	if err != nil {
		t.Fatal(err)
	}
	publish401 := func(accessToken string) {
		t.Helper()
		fp := events.Fingerprint(accessToken)
		data, err := events.Encode(key, "test/acme", events.Unauthorized{Fingerprint: fp, Runtime: "runtime-1", Status: 401})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := acmeJS.Publish(ctx, subj.Event(events.Type401, key), data, jetstream.WithMsgID(events.MsgID(events.Type401, key, fp))); err != nil {
			t.Fatalf("acme publishes a 401: %v", err)
		}
	}
	publish401(tok.AccessToken)
	v2 := waitRotated(t, rotated, 2)
	if as.Calls() != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", as.Calls())
	}

	// acme reads its own current token through the service.
	msg, err = acme.Request(subj.Token(key), nil, 10*time.Second)
	if err != nil || msg.Header.Get("Nats-Service-Error-Code") != "" {
		t.Fatalf("acme reads its token: %v %s", err, msgData(msg))
	}
	var cur events.Rotated
	if err := json.Unmarshal(msg.Data, &cur); err != nil || cur.AccessToken != v2.AccessToken {
		t.Errorf("auth.token answer %+v (%v), want the rotated token", cur.Version, err)
	}

	t.Run("tenant isolation", func(t *testing.T) {
		other, _ := events.ParseKey("globex.bob.github")
		// Denied publishes and subscriptions are dropped by the server,
		// which tells the client asynchronously.
		_ = acme.PublishRequest(subj.Token(other), acme.NewRespInbox(), nil)
		_ = acme.PublishRequest(subj.Register(other), acme.NewRespInbox(), body)
		if _, err := acme.SubscribeSync(subj.Event(events.TypeRotated, other)); err != nil {
			t.Fatal(err)
		}
		if _, err := acme.SubscribeSync("_INBOX.>"); err != nil {
			t.Fatal(err)
		}
		_ = acme.Publish("$JS.API.STREAM.PURGE."+subj.EventsStream(), nil)
		_ = acme.Flush()
		for _, want := range [][]string{
			{"Publish", subj.Token(other)},
			{"Publish", subj.Register(other)},
			{"Subscription", subj.Event(events.TypeRotated, other)},
			{"Subscription", `"_INBOX.>"`},
			{"Publish", "$JS.API.STREAM.PURGE"},
		} {
			fleet.Eventually(t, 10*time.Second, "permissions violation "+strings.Join(want, " "), func() bool {
				return acmeErrs.has(append([]string{"Permissions Violation"}, want...)...)
			})
		}

		// Without its inbox prefix a tenant's client gets no replies.
		var errs asyncErrors
		plain := c.connect(t, 0, "acme", nats.ErrorHandler(errs.handler))
		_, err := plain.Request(subj.Token(key), nil, 200*time.Millisecond)
		if err == nil {
			t.Error("acme without _INBOX_acme got a reply")
		}
		fleet.Eventually(t, 10*time.Second, "permissions violation for the default inbox", func() bool {
			return errs.has("Permissions Violation", "Subscription", "_INBOX.")
		})
	})

	t.Run("node failure", func(t *testing.T) {
		info, err := js.Stream(ctx, subj.EventsStream())
		if err != nil {
			t.Fatal(err)
		}
		leader := info.CachedInfo().Cluster.Leader
		for _, s := range c.servers {
			if s.Name() == leader {
				s.Shutdown()
				s.WaitForShutdown()
			}
		}
		t.Logf("stopped %s, the leader of %s", leader, subj.EventsStream())
		// acme's connection may have been on the stopped node: it
		// reconnects, and its subscription with it.
		fleet.Eventually(t, 30*time.Second, "a new stream leader", func() bool {
			st, err := js.Stream(ctx, subj.EventsStream())
			return err == nil && st.CachedInfo().Cluster.Leader != "" && st.CachedInfo().Cluster.Leader != leader
		})
		fleet.Eventually(t, 30*time.Second, "acme connected", acme.IsConnected)
		publish401(v2.AccessToken)
		waitRotated(t, rotated, 3)
	})
}

func msgData(m *nats.Msg) []byte {
	if m == nil {
		return nil
	}
	return m.Data
}

// waitRotated waits for the auth.rotated of version v.
func waitRotated(t *testing.T, ch <-chan events.Rotated, v int64) events.Rotated {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case r := <-ch:
			if r.Version == v {
				return r
			}
		case <-deadline:
			t.Fatalf("no auth.rotated version %d within 30s", v)
		}
	}
}

type tlog struct {
	t    *testing.T
	name string
}

func (l tlog) Noticef(f string, v ...any) { l.t.Logf(l.name+" "+f, v...) }
func (l tlog) Warnf(f string, v ...any)   { l.t.Logf(l.name+" WARN "+f, v...) }
func (l tlog) Fatalf(f string, v ...any)  { l.t.Logf(l.name+" FATAL "+f, v...) }
func (l tlog) Errorf(f string, v ...any)  { l.t.Logf(l.name+" ERR "+f, v...) }
func (l tlog) Debugf(f string, v ...any)  {}
func (l tlog) Tracef(f string, v ...any)  {}

// TestNATSUsersMatchRefresherPermissions checks that the refresher and
// tenant users of deploy/nats are what `refresher permissions` prints today,
// so the deployment and the command that documents permissions agree.
func TestNATSUsersMatchRefresherPermissions(t *testing.T) {
	setPasswords(t)
	ours, err := server.ProcessConfigFile(nodeFiles[0])
	if err != nil {
		t.Fatal(err)
	}
	bins := cmdtest.Binaries(t)
	for role, args := range map[string][]string{
		"refresher": {"--refresher"},
		"serve":     {"--serving", "--tenant", "acme"},
		"acme":      {"--tenant", "acme"},
	} {
		cmd := exec.Command(filepath.Join(bins, "refresher"), append([]string{"permissions"}, args...)...)
		cmd.Env = cmdtest.CleanEnv()
		block, err := cmd.Output()
		if err != nil {
			t.Fatalf("refresher permissions %v: %v", args, err)
		}
		conf := filepath.Join(t.TempDir(), "user.conf")
		if err := os.WriteFile(conf, []byte("authorization { users: [\n"+string(block)+"\n] }\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		printed, err := server.ProcessConfigFile(conf)
		if err != nil || len(printed.Users) != 1 {
			t.Fatalf("refresher permissions %v printed no loadable user (%v):\n%s", args, err, block)
		}
		want := printed.Users[0]
		var got *server.User
		for _, u := range ours.Users {
			if u.Username == want.Username {
				got = u
			}
		}
		switch {
		case got == nil:
			t.Errorf("%s: deploy/nats has no user %q, which refresher permissions %v prints", role, want.Username, args)
		case got.Password != want.Password:
			t.Errorf("%s: user %s reads its password from another variable than refresher permissions %v", role, want.Username, args)
		case !reflect.DeepEqual(got.Permissions, want.Permissions):
			t.Errorf("%s: user %s has other permissions than refresher permissions %v prints:\n%s", role, want.Username, args, block)
		}
	}

	// Every password variable of the deployment belongs to a user listed in
	// natsUsers, and no tenant can be given one of the deployment's own:
	// the tenant whose variable it would be is refused as reserved.
	conf, err := os.ReadFile("nats/accounts.conf")
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, nu := range natsUsers {
		known[nu.passwordEnv] = true
	}
	for _, m := range regexp.MustCompile(`\$(AUTHBUS_PASSWORD_\w+)`).FindAllStringSubmatch(string(conf), -1) {
		if !known[m[1]] {
			t.Errorf("deploy/nats/accounts.conf reads $%s, which natsUsers does not list: add its user there", m[1])
		}
	}
	for role, nu := range natsUsers {
		if strings.HasSuffix(nu.user, "-runtime") {
			continue // a tenant's own user
		}
		// The readable form of a password variable: upper case, '-' as '_'.
		tenant := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(nu.passwordEnv, "AUTHBUS_PASSWORD_"), "_", "-"))
		cmd := exec.Command(filepath.Join(bins, "refresher"), "permissions", "--tenant", tenant)
		cmd.Env = cmdtest.CleanEnv()
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "reserved") {
			t.Errorf("%s: refresher permissions --tenant %s printed a user with the password variable of %s (%v):\n%s",
				role, tenant, nu.user, err, out)
		}
	}
}
