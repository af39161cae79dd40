package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/embedded"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
	"github.com/authbus/authbus/workers/egress"
)

// tenantDeployment is a deployment with tenants, as `refresher
// permissions` prints it: an embedded server loaded with the users of
// tenants acme and bravo, the refreshers' user and their serving user, a
// pool that stores as the one and serves as the other, and the test
// authorization server. Tests act as a tenant's own connection: what it
// can do there, a hostile tenant can do.
type tenantDeployment struct {
	ns    *server.Server
	as    *authtest.Server
	subj  events.Subjects
	logs  *fleet.LogBuffer
	js    jetstream.JetStream // the refreshers' user: reads what tenants cannot
	store *kv.Store
	a, b  *tenantConn // acme, bravo
}

type tenantConn struct {
	tenant string
	nc     *nats.Conn
	js     jetstream.JetStream

	mu         sync.Mutex
	violations []string
}

func (c *tenantConn) denied(what string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, v := range c.violations {
		if strings.Contains(v, what) {
			return true
		}
	}
	return false
}

// startTenantDeployment starts it; tune adjusts the pool's config.
func startTenantDeployment(t *testing.T, tune func(*workers.Config)) *tenantDeployment {
	return startTenants(t, false, tune)
}

// startTenants starts it with the refreshers' two users, or with one
// (combined) that stores and serves on one connection.
func startTenants(t *testing.T, combined bool, tune func(*workers.Config)) *tenantDeployment {
	t.Helper()
	for _, v := range []string{"AUTHBUS_PASSWORD_ACME", "AUTHBUS_PASSWORD_BRAVO", "AUTHBUS_PASSWORD_REFRESHER", "AUTHBUS_PASSWORD_SERVE"} {
		t.Setenv(v, "pw-"+strings.ToLower(v))
	}
	refresherUsers := permissionsBlock(t, "--refresher") + "\n" + permissionsBlock(t, "--serving", "--tenant", "acme,bravo")
	if combined {
		refresherUsers = permissionsBlock(t, "--refresher", "--serving", "--tenant", "acme,bravo")
	}
	conf := fmt.Sprintf("authorization {\n  users: [\n%s\n%s\n%s\n  ]\n}\n",
		permissionsBlock(t, "--tenant", "acme"), permissionsBlock(t, "--tenant", "bravo"), refresherUsers)
	dir := t.TempDir()
	confPath := filepath.Join(dir, "nats.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	ns, err := embedded.Start(embedded.Config{Listen: "127.0.0.1:0", DataDir: dir, ConfigFile: confPath})
	if err != nil {
		t.Fatalf("embedded server with the printed config: %v\n%s", err, conf)
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	d := &tenantDeployment{ns: ns, as: authtest.New(t), logs: &fleet.LogBuffer{}}
	d.subj, _ = events.NewSubjects("")
	d.as.AddClient(fleet.ClientID, fleet.ClientSecret)

	user := func(name, password string) *nats.Conn {
		nc, err := nats.Connect(ns.ClientURL(), nats.UserInfo(name, password))
		if err != nil {
			t.Fatalf("connect as %s: %v", name, err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	refresherNC := user("authbus-refresher", "pw-authbus_password_refresher")
	serveNC := refresherNC
	if !combined {
		serveNC = user("authbus-serve", "pw-authbus_password_serve")
	}
	ring, err := kv.NewKeyRing("k1", map[string][]byte{"k1": bytes.Repeat([]byte{1}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	cfg := workers.Config{
		Workers: 8, TokenTimeout: 5 * time.Second, LeaseTTL: 3 * time.Second, AckWait: 3 * time.Second,
		RetryBase: 50 * time.Millisecond, RetryMax: time.Second, LeaseWait: 100 * time.Millisecond,
		Seal: ring, TokenHosts: egress.Policy{AllowLoopback: true},
		ServeConn: serveNC,
		Logger:    slog.New(slog.NewJSONHandler(d.logs, nil)),
	}
	if tune != nil {
		tune(&cfg)
	}
	pool, err := workers.New(context.Background(), refresherNC, cfg)
	if err != nil {
		t.Fatalf("a pool as the refresher user: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pool.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("pool: %v", err)
		}
	})
	d.js, _ = jetstream.New(refresherNC)
	d.store = pool.Store()
	d.a, d.b = d.connect(t, "acme"), d.connect(t, "bravo")
	return d
}

// connect opens tenant's runtime connection, with its inbox prefix, and
// records the permission errors the server reports to it.
func (d *tenantDeployment) connect(t *testing.T, tenant string) *tenantConn {
	t.Helper()
	c := &tenantConn{tenant: tenant}
	nc, err := nats.Connect(d.ns.ClientURL(),
		nats.UserInfo(tenant+"-runtime", "pw-authbus_password_"+tenant),
		nats.CustomInboxPrefix(TenantInboxPrefix(tenant)),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			c.mu.Lock()
			c.violations = append(c.violations, err.Error())
			c.mu.Unlock()
		}))
	if err != nil {
		t.Fatalf("connect as %s: %v", tenant, err)
	}
	t.Cleanup(nc.Close)
	c.nc = nc
	c.js, _ = jetstream.New(nc)
	return c
}

// register registers key from c with fresh tokens of the test server,
// with tune applied to the request.
func (d *tenantDeployment) register(t *testing.T, c *tenantConn, key events.Key, tune func(*events.RegisterRequest)) (events.RegisterReply, error) {
	t.Helper()
	tok := d.as.Issue(fleet.ClientID)
	req := events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn},
		TokenEndpoint: d.as.TokenURL(), ClientID: fleet.ClientID, ClientSecret: fleet.ClientSecret,
	}
	if tune != nil {
		tune(&req)
	}
	body, _ := json.Marshal(req)
	var reply events.RegisterReply
	var msg *nats.Msg
	var err error
	// The service starts asynchronously: retry while nobody answers.
	fleet.Eventually(t, 10*time.Second, "the token service answers", func() bool {
		msg, err = c.nc.Request(d.subj.Register(key), body, 2*time.Second)
		return !errors.Is(err, nats.ErrNoResponders)
	})
	if err != nil {
		return reply, err
	}
	if code := msg.Header.Get("Nats-Service-Error-Code"); code != "" {
		return reply, fmt.Errorf("%s: %s", code, msg.Data)
	}
	return reply, json.Unmarshal(msg.Data, &reply)
}

// report publishes a 401 for key's token fp from c as a runtime does:
// through JetStream, with the protocol's Nats-Msg-Id, extra headers added.
func (d *tenantDeployment) report(c *tenantConn, key events.Key, fp string, header nats.Header) (*jetstream.PubAck, error) {
	data, _ := events.Encode(key, "test/"+c.tenant, events.Unauthorized{Fingerprint: fp, Runtime: c.tenant})
	m := nats.NewMsg(d.subj.Event(events.Type401, key))
	m.Data = data
	for k, vs := range header {
		m.Header[k] = vs
	}
	if m.Header.Get(jetstream.MsgIDHeader) == "" {
		m.Header.Set(jetstream.MsgIDHeader, events.MsgID(events.Type401, key, fp))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.js.PublishMsg(ctx, m)
}
