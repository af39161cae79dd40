package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/cmdtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
	"github.com/authbus/authbus/internal/storm"
	"github.com/authbus/authbus/kv"
)

// The deployment users move to when they outgrow one machine, run for
// real: a 3-node JetStream cluster (in this process, its routes through
// proxies that can make a node lag) and three refresher processes, each on
// its own node, with --replicas 3.

// clusterDeployment is that topology.
type clusterDeployment struct {
	c      *natstest.Cluster
	ring   *kv.KeyRing // the seal keys every refresher shares
	stderr []*fleet.LogBuffer
}

// startClusterDeployment starts a 3-node cluster (syncing every write, as
// deploy/nats does) and a refresher process on each node. extra flags go
// to every refresher.
func startClusterDeployment(tb testing.TB, extra ...string) *clusterDeployment {
	tb.Helper()
	bin := cmdtest.Binaries(tb)
	d := &clusterDeployment{c: natstest.RunCluster(tb, 3, natstest.SyncAlways())}
	keyFile := filepath.Join(tb.TempDir(), "seal-keys.json")
	var err error
	if d.ring, _, err = kv.LoadOrCreateKeyRing(keyFile); err != nil {
		tb.Fatal(err)
	}
	for i := range 3 {
		args := append([]string{
			"--nats-url", d.c.ClientURL(i), "--replicas", "3", "--seal-key-file", keyFile,
			"--instance", fmt.Sprintf("refresher-%d", i), "--metrics-addr", "",
			// The test authorization servers listen on 127.0.0.1.
			"--allow-loopback-token-hosts",
		}, extra...)
		cmd := exec.Command(filepath.Join(bin, "refresher"), args...)
		cmd.Env = append(os.Environ(), "OTEL_TRACES_EXPORTER=none", "OTEL_METRICS_EXPORTER=none")
		_, stderr, exited := startRefresher(tb, cmd)
		d.stderr = append(d.stderr, stderr)
		tb.Cleanup(func() {
			// SIGTERM, as a deployment stops a refresher: it finishes its
			// work and releases its leases.
			_ = cmd.Process.Signal(os.Interrupt)
			select {
			case <-exited:
			case <-time.After(30 * time.Second):
				tb.Errorf("refresher %d did not stop within 30s of SIGTERM", i)
			}
		})
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			for i, b := range d.stderr {
				tb.Logf("refresher %d:\n%s", i, b.String())
			}
		}
	})
	return d
}

// leadNothing moves every authbus stream's leader off node i, so that
// making it lag slows no write down.
func (d *clusterDeployment) leadNothing(tb testing.TB, nc *nats.Conn, i int) {
	tb.Helper()
	subj, _ := events.NewSubjects("")
	for _, s := range []string{subj.EventsStream(), subj.SchedulesStream(), subj.ReauthStream(),
		kv.BucketStream(subj.CredentialsBucket()), kv.BucketStream(subj.LeasesBucket())} {
		if d.c.StreamLeader(s) == i {
			d.c.MoveLeader(nc, s)
		}
	}
}

// TestClusterRefresherProcesses races three refresher processes, each on
// its own node of a 3-node cluster with R3 streams and buckets, for every
// generation of a set of credentials, while one node lags in replication.
// Every 401 reaches a refresher (no Nats-Msg-Id), a few milliseconds
// apart, so they contend for each generation, and the server revokes the whole grant on a reuse (node
// oidc-provider): one presentation of a spent refresh token and the
// credential never rotates again.
func TestClusterRefresherProcesses(t *testing.T) {
	t.Parallel()
	d := startClusterDeployment(t)
	as := authtest.New(t)
	as.AddClient(fleet.ClientID, fleet.ClientSecret)
	as.SetReuse(authtest.ReuseRevokeFamily)
	as.SetLatency(5 * time.Millisecond)
	nc := d.c.Connect(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	subj, _ := events.NewSubjects("")
	ctx := context.Background()

	const creds, waves, racing = 16, 20, 4
	const stagger = 12 * time.Millisecond
	var keys []events.Key
	for i := range creds {
		key := fleet.MustKey(t, fmt.Sprintf("acme.u%d.api", i))
		tok := as.Issue(fleet.ClientID)
		body, _ := json.Marshal(events.RegisterRequest{
			Token:         events.RegisterToken{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn},
			TokenEndpoint: as.TokenURL(), ClientID: fleet.ClientID, ClientSecret: fleet.ClientSecret,
		})
		fleet.Eventually(t, 30*time.Second, "registration of "+key.String(), func() bool {
			msg, err := nc.Request(subj.Register(key), body, 2*time.Second)
			return err == nil && msg.Header.Get("Nats-Service-Error-Code") == ""
		})
		keys = append(keys, key)
	}
	store, err := kv.OpenStore(ctx, js, subj.CredentialsBucket(), d.ring)
	if err != nil {
		t.Fatal(err)
	}
	const lagging = 2
	d.leadNothing(t, nc, lagging)
	d.c.Lag(lagging, 30*time.Millisecond)
	for wave := 1; wave <= waves; wave++ {
		for _, key := range keys {
			cur, _, err := store.Latest(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			data, _ := events.Encode(key, "test/rt", events.Unauthorized{Fingerprint: cur.Fingerprint, Runtime: "rt"})
			// The runtimes see the 401 a little apart, so that the later
			// reports reach a refresher while the first one's rotation is
			// still on its way to the lagging node.
			for r := range racing {
				time.AfterFunc(time.Duration(r)*stagger, func() {
					if _, err := js.Publish(ctx, subj.Event(events.Type401, key), data); err != nil {
						t.Errorf("publish a 401: %v", err)
					}
				})
			}
		}
		fleet.Eventually(t, 60*time.Second, fmt.Sprintf("wave %d rotated every credential", wave), func() bool {
			for _, key := range keys {
				if cur, _, err := store.Latest(ctx, key); err != nil || cur.Version < int64(1+wave) {
					return false
				}
			}
			return true
		})
	}
	d.c.Lag(lagging, 0)
	t.Logf("%d refresher processes, %d credentials × %d waves, %d racing 401s each %v apart, one node lagging 30ms: %d token calls, %d reuses",
		3, creds, waves, racing, stagger, as.Calls(), as.Reuses())
	if as.Reuses() != 0 || as.Calls() != creds*waves {
		t.Errorf("%d token calls and %d reuses for %d generations; want one call per generation and no reuse", as.Calls(), as.Reuses(), creds*waves)
	}
	for _, key := range keys {
		if c, _, err := store.Latest(ctx, key); err != nil || c.State != kv.StateActive {
			t.Errorf("%s: %v %v, want active", key, c, err)
		}
	}
	d.c.WaitCurrent(subj.EventsStream(), kv.BucketStream(subj.CredentialsBucket()), kv.BucketStream(subj.LeasesBucket()))
}

// BenchmarkClusterStorm runs `publisher storm --nats-url` (the storm's own
// code) against three refresher processes on a 3-node cluster with R3
// streams and buckets, and the bare-NATS ceiling on the same cluster, with
// the same replication, in the same run:
//
//	go test -run '^$' -bench ClusterStorm -benchtime 1x ./cmd/refresher/
//
// AUTHBUS_STORM_CREDENTIALS sets the number of credentials (default 500).
func BenchmarkClusterStorm(b *testing.B) {
	d := startClusterDeployment(b)
	k := 500
	if v := os.Getenv("AUTHBUS_STORM_CREDENTIALS"); v != "" {
		fmt.Sscan(v, &k)
	}
	for b.Loop() {
		rep, err := storm.Run(context.Background(), storm.Config{
			NATSURL: d.c.URLs(), Modes: []storm.Mode{storm.ModeAuthbus, storm.ModeCeiling},
			Credentials: k, Progress: os.Stderr,
		})
		if err != nil {
			b.Fatal(err)
		}
		if err := rep.WriteTable(os.Stdout); err != nil {
			b.Fatal(err)
		}
		a, c := rep.Mode(storm.ModeAuthbus), rep.Mode(storm.ModeCeiling)
		b.ReportMetric(a.CallsPerGeneration.Mean, "calls/gen")
		b.ReportMetric(float64(a.Reuses), "reuses")
		b.ReportMetric(a.BacklogRefreshesPerSec/c.BacklogRefreshesPerSec*100, "%ceiling")
		if a.ProbeAdded != nil {
			b.ReportMetric(a.ProbeAdded.P50Ms, "added-p50-ms")
			b.ReportMetric(a.ProbeAdded.P99Ms, "added-p99-ms")
		}
	}
}
