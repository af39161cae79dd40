package storm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
)

// ceiling is the bare-NATS ceiling: the NATS operations one refresh needs
// (consume, KV get, create lease, CAS update, publish, delete lease, ack)
// and the same x/oauth2 call, with none of authbus's code — no validation,
// sealing, tracing, logging, breakers or scheduling — at the concurrency of
// the pools (Pools groups of Workers, each group on its own connection).
// It runs on a stream, consumer and buckets of its own, named after the
// run, and removes them afterwards.
type ceiling struct {
	cfg    Config
	ep     *endpoint
	env    *natsEnv
	run    string
	prefix string          // subject prefix
	subj   events.Subjects // names of its stream and buckets
	keys   []events.Key

	mu  sync.Mutex
	cur []current

	ws     atomic.Pointer[waveState]
	sub    *nats.Subscription
	stream jetstream.Stream
	creds  jetstream.KeyValue
	groups []*ceilingGroup
}

// ceilingRecord is the ceiling's credential: plain JSON, nothing sealed.
type ceilingRecord struct {
	Version      int64  `json:"version"`
	Fingerprint  string `json:"fingerprint"`
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
}

// ceilingRotated is what the ceiling announces.
type ceilingRotated struct {
	Version     int64  `json:"version"`
	Fingerprint string `json:"fingerprint"`
	AccessToken string `json:"access_token"`
}

type ceilingGroup struct {
	nc     *nats.Conn
	js     jetstream.JetStream
	creds  jetstream.KeyValue
	leases jetstream.KeyValue
	cancel context.CancelFunc
	done   chan struct{}
}

const (
	ceilingConsumer = "ceiling"
	ceilingLeaseTTL = time.Minute
)

func newCeiling(cfg Config, ep *endpoint, env *natsEnv, run string) *ceiling {
	return &ceiling{cfg: cfg, ep: ep, env: env, run: run,
		prefix: "stormceil" + run, subj: mustSubjects("stormceil" + run),
		keys: stormKeys(run, "ceiling", cfg.Credentials), cur: make([]current, cfg.Credentials)}
}

// mustSubjects is events.NewSubjects for a prefix made of valid tokens.
func mustSubjects(prefix string) events.Subjects {
	s, err := events.NewSubjects(prefix)
	if err != nil {
		panic(err)
	}
	return s
}

func (c *ceiling) prepare(ctx context.Context) error {
	js := c.env.js
	// The ceiling's streams and buckets are as replicated as the
	// deployment's credential bucket, so that both pay the same for
	// replication.
	replicas := 1
	if subj, err := events.NewSubjects(c.cfg.Prefix); err == nil {
		if s, err := js.Stream(ctx, kv.BucketStream(subj.CredentialsBucket())); err == nil {
			replicas = s.CachedInfo().Config.Replicas
		}
	}
	var err error
	c.stream, err = js.CreateStream(ctx, jetstream.StreamConfig{
		Name:       c.subj.EventsStream(),
		Subjects:   []string{c.subj.EventWildcard(events.Type401)},
		Retention:  jetstream.WorkQueuePolicy,
		Storage:    jetstream.FileStorage,
		Duplicates: 30 * time.Second,
		Replicas:   replicas,
	})
	if err != nil {
		return fmt.Errorf("create ceiling stream: %w", err)
	}
	if _, err = js.CreateConsumer(ctx, c.subj.EventsStream(), jetstream.ConsumerConfig{
		Durable: ceilingConsumer, AckPolicy: jetstream.AckExplicitPolicy,
		AckWait: 30 * time.Second, MaxDeliver: 20, MaxAckPending: -1,
	}); err != nil {
		return fmt.Errorf("create ceiling consumer: %w", err)
	}
	if c.creds, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: c.subj.CredentialsBucket(), History: 5, Replicas: replicas}); err != nil {
		return fmt.Errorf("create ceiling credential bucket: %w", err)
	}
	if _, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: c.subj.LeasesBucket(), History: 1, LimitMarkerTTL: time.Second, Replicas: replicas}); err != nil {
		return fmt.Errorf("create ceiling lease bucket: %w", err)
	}
	if c.sub, err = c.env.nc.Subscribe(c.prefix+".rotated.>", c.onRotated); err != nil {
		return err
	}
	_ = c.sub.SetPendingLimits(-1, -1)

	var g errgroup.Group
	g.SetLimit(c.cfg.Publishers)
	for i, key := range c.keys {
		g.Go(func() error {
			tok, err := c.ep.issue(c.run, i)
			if err != nil {
				return err
			}
			rec := ceilingRecord{Version: 1, Fingerprint: events.Fingerprint(tok.AccessToken), AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken}
			data, _ := json.Marshal(rec)
			if _, err := c.creds.Create(ctx, key.String(), data); err != nil {
				return fmt.Errorf("create ceiling credential %s: %w", key, err)
			}
			c.mu.Lock()
			c.cur[i] = current{version: 1, fp: rec.Fingerprint}
			c.mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	for p := range c.cfg.Pools {
		if err := c.startGroup(ctx, p); err != nil {
			return err
		}
	}
	return nil
}

func (c *ceiling) startGroup(ctx context.Context, p int) error {
	nc, err := c.env.connect(fmt.Sprintf("ceiling-%d", p))
	if err != nil {
		return err
	}
	g := &ceilingGroup{nc: nc, done: make(chan struct{})}
	if g.js, err = jetstream.New(nc); err == nil {
		if g.creds, err = g.js.KeyValue(ctx, c.subj.CredentialsBucket()); err == nil {
			g.leases, err = g.js.KeyValue(ctx, c.subj.LeasesBucket())
		}
	}
	var cons jetstream.Consumer
	if err == nil {
		cons, err = g.js.Consumer(ctx, c.subj.EventsStream(), ceilingConsumer)
	}
	var msgs jetstream.MessagesContext
	if err == nil {
		msgs, err = cons.Messages(jetstream.PullMaxMessages(c.cfg.Workers))
	}
	if err != nil {
		nc.Close()
		return fmt.Errorf("start ceiling worker group: %w", err)
	}
	gctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	g.cancel = cancel
	stop := context.AfterFunc(gctx, msgs.Drain)
	go func() {
		defer close(g.done)
		defer stop()
		var eg errgroup.Group
		eg.SetLimit(c.cfg.Workers)
		for {
			msg, err := msgs.Next()
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				break
			}
			if err != nil {
				continue
			}
			eg.Go(func() error {
				c.handle(gctx, g, msg)
				return nil
			})
		}
		_ = eg.Wait()
	}()
	c.groups = append(c.groups, g)
	return nil
}

// handle is one refresh with bare NATS operations.
func (c *ceiling) handle(ctx context.Context, g *ceilingGroup, msg jetstream.Msg) {
	key := strings.TrimPrefix(msg.Subject(), c.prefix+".401.")
	k, err := events.ParseKey(key)
	if err != nil {
		_ = msg.Term()
		return
	}
	i, ok := userIndex(k.User, len(c.keys))
	if !ok {
		_ = msg.Term()
		return
	}
	var ev struct {
		Data struct {
			Fingerprint string `json:"fingerprint"`
		} `json:"data"`
	}
	_ = json.Unmarshal(msg.Data(), &ev)
	entry, err := g.creds.Get(ctx, key)
	if err != nil {
		_ = msg.NakWithDelay(100 * time.Millisecond)
		return
	}
	var rec ceilingRecord
	_ = json.Unmarshal(entry.Value(), &rec)
	if rec.Fingerprint != ev.Data.Fingerprint {
		c.announce(g, key, rec)
		_ = msg.Ack()
		return
	}
	lrev, err := g.leases.Create(ctx, key, []byte("ceiling"), jetstream.KeyTTL(ceilingLeaseTTL))
	if err != nil {
		_ = msg.NakWithDelay(100 * time.Millisecond)
		return
	}
	release := func() { _ = g.leases.Purge(ctx, key, jetstream.LastRevision(lrev), jetstream.PurgeTTL(time.Second)) }
	tok, err := c.ep.refresh(ctx, i, rec.RefreshToken)
	if err != nil {
		release()
		if permanentErr(err) {
			if ws := c.ws.Load(); ws != nil {
				ws.needsReauth.Add(1)
				ws.settle(i, false)
			}
			_ = msg.Ack()
			return
		}
		_ = msg.NakWithDelay(time.Second)
		return
	}
	rec.Version++
	rec.AccessToken, rec.Fingerprint = tok.AccessToken, events.Fingerprint(tok.AccessToken)
	if tok.RefreshToken != "" {
		rec.RefreshToken = tok.RefreshToken
	}
	data, _ := json.Marshal(rec)
	if _, err := g.creds.Update(ctx, key, data, entry.Revision()); err == nil {
		c.announce(g, key, rec)
	}
	release()
	_ = msg.Ack()
}

func (c *ceiling) announce(g *ceilingGroup, key string, rec ceilingRecord) {
	data, _ := json.Marshal(ceilingRotated{Version: rec.Version, Fingerprint: rec.Fingerprint, AccessToken: rec.AccessToken})
	_ = g.nc.Publish(c.prefix+".rotated."+key, data)
}

func (c *ceiling) onRotated(m *nats.Msg) {
	k, err := events.ParseKey(strings.TrimPrefix(m.Subject, c.prefix+".rotated."))
	if err != nil {
		return
	}
	i, ok := userIndex(k.User, len(c.keys))
	if !ok {
		return
	}
	var r ceilingRotated
	if json.Unmarshal(m.Data, &r) != nil {
		return
	}
	c.mu.Lock()
	newer := r.Version > c.cur[i].version
	if newer {
		c.cur[i] = current{version: r.Version, fp: r.Fingerprint}
	}
	c.mu.Unlock()
	if ws := c.ws.Load(); newer && ws != nil {
		ws.settle(i, true)
	}
}

func (c *ceiling) wave(ctx context.Context, ws *waveState) error {
	return runWave(ctx, c.cfg, c.env.js, c.lanes(), &c.ws, ws, c.cfg.Runtimes, false, c.msg401())
}

func (c *ceiling) drain(ctx context.Context, ws *waveState) (time.Duration, error) {
	return drainWave(ctx, c.cfg, c.env.js, c.lanes(), &c.ws, ws, c.msg401())
}

// lanes is the ceiling's one consumer; the runtimes write into its stream.
func (c *ceiling) lanes() lanes {
	return lanes{stream: c.subj.EventsStream(), consumers: []lane{
		{ceilingConsumer, c.subj.Event(events.Type401, wakeKey(c.keys[0]))}}}
}

// msg401 returns the 401 of every credential's current token: the same
// runtime side as authbus's.
func (c *ceiling) msg401() func(i int) (string, []byte, string, error) {
	c.mu.Lock()
	fps := make([]string, len(c.cur))
	for i, cur := range c.cur {
		fps[i] = cur.fp
	}
	c.mu.Unlock()
	return func(i int) (string, []byte, string, error) {
		key, fp := wakeKey(c.keys[0]), wakeFingerprint
		if i >= 0 {
			key, fp = c.keys[i], fps[i]
		}
		data, err := events.Encode(key, "storm/runtime", events.Unauthorized{Fingerprint: fp, Runtime: "storm", Status: 401})
		return c.subj.Event(events.Type401, key), data, events.MsgID(events.Type401, key, fp), err
	}
}

func (c *ceiling) probe(ctx context.Context, i int) (time.Duration, time.Duration, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.WaveTimeout)
	defer cancel()
	ws := newWave(len(c.keys), 1)
	c.ws.Store(ws)
	defer c.ws.Store(nil)
	c.mu.Lock()
	fp := c.cur[i].fp
	c.mu.Unlock()
	data, err := events.Encode(c.keys[i], "storm/runtime", events.Unauthorized{Fingerprint: fp, Runtime: "storm-probe", Status: 401})
	if err != nil {
		return 0, 0, false, err
	}
	calls := c.ep.tr.count()
	start := time.Now()
	ws.started(i)
	if _, err := c.env.js.Publish(ctx, c.subj.Event(events.Type401, c.keys[i]), data,
		jetstream.WithMsgID(events.MsgID(events.Type401, c.keys[i], fp))); err != nil {
		return 0, 0, false, fmt.Errorf("publish 401: %w", err)
	}
	if err := ws.wait(ctx); err != nil {
		return 0, 0, false, err
	}
	total := time.Since(start)
	own := c.ep.tr.since(calls)
	if len(own) != 1 {
		return total, 0, false, nil
	}
	return total, own[0], true, nil
}

func (c *ceiling) close() {
	if c.sub != nil {
		_ = c.sub.Unsubscribe()
	}
	for _, g := range c.groups {
		g.cancel()
		<-g.done
		_ = g.nc.Drain()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = c.env.js.DeleteStream(ctx, c.subj.EventsStream())
	_ = c.env.js.DeleteKeyValue(ctx, c.subj.CredentialsBucket())
	_ = c.env.js.DeleteKeyValue(ctx, c.subj.LeasesBucket())
}
