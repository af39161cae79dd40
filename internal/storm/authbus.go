package storm

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
	"github.com/authbus/authbus/workers/egress"
)

// authbus is the authbus mode: the runtimes publish auth.401 and watch
// auth.rotated; refresher pools (in this process on the embedded server, or
// the external deployment's) do the rest.
type authbus struct {
	cfg  Config
	ep   *endpoint
	env  *natsEnv
	run  string
	subj events.Subjects
	keys []events.Key

	mu  sync.Mutex
	cur []current // per credential: what the runtimes hold

	ws    atomic.Pointer[waveState]
	subs  []*nats.Subscription
	pools []*runningPool
}

// current is a credential's token as its runtimes know it.
type current struct {
	version int64
	fp      string
}

type runningPool struct {
	nc     *nats.Conn
	cancel context.CancelFunc
	done   chan error
}

func newAuthbus(cfg Config, ep *endpoint, env *natsEnv, run string) *authbus {
	subj, _ := events.NewSubjects(cfg.Prefix) // validated by the caller's NewSubjects below
	a := &authbus{cfg: cfg, ep: ep, env: env, run: run, subj: subj,
		keys: stormKeys(run, "api", cfg.Credentials), cur: make([]current, cfg.Credentials)}
	return a
}

// stormKeys are the credential keys of a run: a tenant of its own, so runs
// against the same deployment never meet.
func stormKeys(run, server string, k int) []events.Key {
	keys := make([]events.Key, k)
	for i := range keys {
		keys[i] = events.Key{Tenant: "storm-" + run, User: fmt.Sprintf("u%d", i), Server: server}
	}
	return keys
}

func (a *authbus) prepare(ctx context.Context) error {
	if _, err := events.NewSubjects(a.cfg.Prefix); err != nil {
		return fmt.Errorf("prefix %q: %w", a.cfg.Prefix, err)
	}
	if !a.env.external() {
		if err := a.startPools(ctx); err != nil {
			return err
		}
	}
	tenant := a.keys[0].Tenant
	for _, t := range []events.Type{events.TypeRotated, events.TypeNeedsReauth} {
		sub, err := a.env.nc.Subscribe(a.subj.Prefix()+"."+t.Word()+"."+tenant+".>", func(m *nats.Msg) { a.onEvent(t, m) })
		if err != nil {
			return fmt.Errorf("subscribe to %s events: %w", t, err)
		}
		// A storm announces thousands of tokens at once: a slow consumer
		// here would lose the very events being counted.
		_ = sub.SetPendingLimits(-1, -1)
		a.subs = append(a.subs, sub)
	}
	if err := a.env.nc.Flush(); err != nil {
		return err
	}
	var g errgroup.Group
	g.SetLimit(a.cfg.Publishers)
	for i, key := range a.keys {
		g.Go(func() error { return a.register(ctx, i, key) })
	}
	return g.Wait()
}

// startPools starts the in-process refresher pools, each on its own
// connection as separate processes would be, and waits until their token
// service answers.
func (a *authbus) startPools(ctx context.Context) error {
	seal := make([]byte, 32)
	_, _ = rand.Read(seal)
	ring, err := kv.NewKeyRing("storm", map[string][]byte{"storm": seal})
	if err != nil {
		return err
	}
	for p := range a.cfg.Pools {
		nc, err := a.env.connect(fmt.Sprintf("pool-%d", p))
		if err != nil {
			return err
		}
		pool, err := workers.New(ctx, nc, workers.Config{
			Prefix:     a.cfg.Prefix,
			Workers:    a.cfg.Workers,
			Instance:   fmt.Sprintf("storm-%s-pool-%d", a.run, p),
			Seal:       ring,
			HTTPClient: a.ep.hc,
			// The built-in server listens on 127.0.0.1.
			TokenHosts: egress.Policy{AllowLoopback: true},
			Logger:     slog.New(slog.NewJSONHandler(a.cfg.PoolLog, nil)),
		})
		if err != nil {
			nc.Close()
			return fmt.Errorf("start refresher pool: %w", err)
		}
		pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		rp := &runningPool{nc: nc, cancel: cancel, done: make(chan error, 1)}
		go func() { rp.done <- pool.Run(pctx) }()
		a.pools = append(a.pools, rp)
	}
	probe := a.subj.Token(events.Key{Tenant: "storm-" + a.run, User: "probe", Server: "probe"})
	// Run starts the service asynchronously: poll until it answers.
	deadline := time.After(10 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		_, err := a.env.nc.Request(probe, nil, time.Second)
		if !errors.Is(err, nats.ErrNoResponders) {
			return nil
		}
		select {
		case <-tick.C:
		case <-deadline:
			return errors.New("the in-process refresher pools did not answer on auth.token within 10s")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (a *authbus) register(ctx context.Context, i int, key events.Key) error {
	tok, err := a.ep.issue(a.run, i)
	if err != nil {
		return err
	}
	id, secret := a.ep.client(i)
	body, err := json.Marshal(events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: tok.AccessToken, TokenType: tok.TokenType, RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn},
		TokenEndpoint: a.ep.url,
		ClientID:      id,
		ClientSecret:  secret,
		AuthStyle:     events.AuthStyleBasic,
		Grant:         a.ep.grant,
	})
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	msg, err := a.env.nc.RequestWithContext(rctx, a.subj.Register(key), body)
	if err != nil {
		return fmt.Errorf("register %s: %w; is a refresher running on %s?", key, err, a.env.url)
	}
	if code := msg.Header.Get("Nats-Service-Error-Code"); code != "" {
		return fmt.Errorf("register %s: refused with %s: %s", key, code, msg.Header.Get("Nats-Service-Error"))
	}
	var reply events.RegisterReply
	if err := json.Unmarshal(msg.Data, &reply); err != nil {
		return fmt.Errorf("register %s: reply: %w", key, err)
	}
	a.mu.Lock()
	if reply.Version > a.cur[i].version {
		a.cur[i] = current{version: reply.Version, fp: reply.Fingerprint}
	}
	a.mu.Unlock()
	return nil
}

// onEvent is a runtime learning about its credential.
func (a *authbus) onEvent(t events.Type, m *nats.Msg) {
	_, key, err := a.subj.ParseEvent(m.Subject)
	if err != nil {
		return
	}
	i, ok := userIndex(key.User, len(a.keys))
	if !ok {
		return
	}
	ev, err := events.Decode(t, key, m.Data)
	if err != nil {
		return
	}
	ws := a.ws.Load()
	if t == events.TypeNeedsReauth {
		if ws != nil {
			ws.needsReauth.Add(1)
			ws.settle(i, false)
		}
		return
	}
	a.mu.Lock()
	newer := ev.Rotated.Version > a.cur[i].version
	if newer {
		a.cur[i] = current{version: ev.Rotated.Version, fp: ev.Rotated.Fingerprint}
	}
	a.mu.Unlock()
	if newer && ws != nil {
		ws.settle(i, true)
	}
}

func (a *authbus) wave(ctx context.Context, ws *waveState) error {
	return runWave(ctx, a.cfg, a.env.js, a.lanes(), &a.ws, ws, a.cfg.Runtimes, false, a.msg401())
}

func (a *authbus) drain(ctx context.Context, ws *waveState) (time.Duration, error) {
	return drainWave(ctx, a.cfg, a.env.js, a.lanes(), &a.ws, ws, a.msg401())
}

// lanes are the refreshers' two consumers (docs/protocol.md): a storm of
// one tenant outruns its rate, and the intake puts the rest in the slow
// lane. A wake for either is written straight into its lane.
func (a *authbus) lanes() lanes {
	wake := wakeKey(a.keys[0])
	return lanes{stream: a.subj.EventsStream(), consumers: []lane{
		{"refreshers", a.subj.Work(events.Type401, wake)},
		{"refreshers-slow", a.subj.Slow(events.Type401, wake)},
	}}
}

// msg401 returns the 401 of every credential's current token.
func (a *authbus) msg401() func(i int) (string, []byte, string, error) {
	a.mu.Lock()
	fps := make([]string, len(a.cur))
	for i, c := range a.cur {
		fps[i] = c.fp
	}
	a.mu.Unlock()
	return func(i int) (string, []byte, string, error) {
		key, fp := wakeKey(a.keys[0]), wakeFingerprint
		if i >= 0 {
			key, fp = a.keys[i], fps[i]
		}
		data, err := events.Encode(key, "storm/runtime", events.Unauthorized{Fingerprint: fp, Runtime: "storm", Status: 401})
		return a.subj.Event(events.Type401, key), data, events.MsgID(events.Type401, key, fp), err
	}
}

func (a *authbus) probe(ctx context.Context, i int) (time.Duration, time.Duration, bool, error) {
	ws := newWave(len(a.keys), 1)
	calls := a.ep.tr.count()
	start := time.Now()
	err := a.wave1(ctx, ws, i)
	total := time.Since(start)
	if err != nil {
		return 0, 0, false, err
	}
	own := a.ep.tr.since(calls)
	if len(own) != 1 {
		return total, 0, false, nil // the call was made by another process
	}
	return total, own[0], true, nil
}

// wave1 is a wave of one 401 for credential i.
func (a *authbus) wave1(ctx context.Context, ws *waveState, i int) error {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.WaveTimeout)
	defer cancel()
	a.ws.Store(ws)
	defer a.ws.Store(nil)
	a.mu.Lock()
	fp := a.cur[i].fp
	a.mu.Unlock()
	data, err := events.Encode(a.keys[i], "storm/runtime", events.Unauthorized{Fingerprint: fp, Runtime: "storm-probe", Status: 401})
	if err != nil {
		return err
	}
	ws.started(i)
	if _, err := a.env.js.Publish(ctx, a.subj.Event(events.Type401, a.keys[i]), data,
		jetstream.WithMsgID(events.MsgID(events.Type401, a.keys[i], fp))); err != nil {
		return fmt.Errorf("publish 401: %w", err)
	}
	return ws.wait(ctx)
}

func (a *authbus) close() {
	for _, s := range a.subs {
		_ = s.Unsubscribe()
	}
	for _, p := range a.pools {
		p.cancel()
		<-p.done
		_ = p.nc.Drain()
	}
	if a.env.external() {
		a.cleanup()
	}
}

// cleanup removes the run's credentials and pending proactive refreshes
// from an external deployment, so that they do not fire against a token
// endpoint that is gone.
func (a *authbus) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The schedules stream, and the events stream where refreshers of an
	// earlier version kept them.
	for _, at := range [][2]string{{a.subj.SchedulesStream(), ".proactive."}, {a.subj.EventsStream(), ".schedule."}} {
		if s, err := a.env.js.Stream(ctx, at[0]); err == nil {
			_ = s.Purge(ctx, jetstream.WithPurgeSubject(a.subj.Prefix()+at[1]+a.keys[0].Tenant+".>"))
		}
	}
	if b, err := a.env.js.KeyValue(ctx, a.subj.CredentialsBucket()); err == nil {
		for _, k := range a.keys {
			_ = b.Purge(ctx, k.String())
		}
	}
}

// lanes are the consumers a mode's events reach.
type lanes struct {
	stream    string
	consumers []lane
}

// lane is one consumer and where to write a message that wakes it.
type lane struct {
	consumer, wake string
}

// runWave publishes the 401s of a wave (msg(i) returns credential i's, and
// msg(-1) one for wakeKey) and waits until every credential settled and
// the consumers have nothing left, so that counts are final. With paused,
// the consumers are paused while the 401s are published and the time from
// their resumption to the last settled credential is returned: the time the
// refreshers took to work off a backlog of one event per credential,
// without publishing going on at the same time.
func runWave(ctx context.Context, cfg Config, js jetstream.JetStream, ls lanes, cur *atomic.Pointer[waveState], ws *waveState, runtimes int, paused bool, msg func(i int) (string, []byte, string, error)) error {
	_, err := runWaveTimed(ctx, cfg, js, ls, cur, ws, runtimes, paused, msg)
	return err
}

func drainWave(ctx context.Context, cfg Config, js jetstream.JetStream, ls lanes, cur *atomic.Pointer[waveState], ws *waveState, msg func(i int) (string, []byte, string, error)) (time.Duration, error) {
	return runWaveTimed(ctx, cfg, js, ls, cur, ws, 1, true, msg)
}

func runWaveTimed(ctx context.Context, cfg Config, js jetstream.JetStream, ls lanes, cur *atomic.Pointer[waveState], ws *waveState, runtimes int, paused bool, msg func(i int) (string, []byte, string, error)) (time.Duration, error) {
	cur.Store(ws)
	defer cur.Store(nil)
	if paused {
		for _, l := range ls.consumers {
			// Paused until a deadline, so that a storm that dies here
			// cannot leave a deployment's refreshers paused for good.
			if _, err := js.PauseConsumer(ctx, ls.stream, l.consumer, time.Now().Add(cfg.WaveTimeout)); err != nil {
				return 0, fmt.Errorf("pause consumer %s/%s: %w", ls.stream, l.consumer, err)
			}
		}
	}
	if err := publish401s(ctx, cfg, js, ws, runtimes, msg); err != nil {
		return 0, err
	}
	start := time.Now()
	if paused {
		for _, l := range ls.consumers {
			if _, err := js.ResumeConsumer(ctx, ls.stream, l.consumer); err != nil {
				return 0, fmt.Errorf("resume consumer %s/%s: %w", ls.stream, l.consumer, err)
			}
		}
		start = time.Now()
		if err := wake(ctx, js, ls, ws, msg); err != nil {
			return 0, err
		}
	}
	if err := ws.wait(ctx); err != nil {
		return 0, err
	}
	took := time.Since(start)
	for _, l := range ls.consumers {
		if err := waitQuiet(ctx, js, ls.stream, l.consumer); err != nil {
			return took, err
		}
	}
	return took, nil
}

// wake wakes resumed consumers. nats-server 2.15 does not: the pull
// requests waiting since the pause get nothing until a new message arrives
// or they expire (seconds later), and on a replicated stream a message
// that arrives before the consumer leader applied the resumption wakes
// nothing either. So a 401 for a credential that does not exist (it is
// terminated as unknown) is written into each consumer's lane until the
// consumer delivers, or has nothing to deliver, or the wave is done.
func wake(ctx context.Context, js jetstream.JetStream, ls lanes, ws *waveState, msg func(i int) (string, []byte, string, error)) error {
	_, data, _, err := msg(-1)
	if err != nil {
		return err
	}
	asleep := make(map[string]lane, len(ls.consumers))
	before := map[string]uint64{}
	for _, l := range ls.consumers {
		asleep[l.consumer] = l
		if c, err := js.Consumer(ctx, ls.stream, l.consumer); err == nil {
			if ci, err := c.Info(ctx); err == nil {
				before[l.consumer] = ci.Delivered.Consumer
			}
		}
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for len(asleep) > 0 {
		for name, l := range asleep {
			if _, err := js.Publish(ctx, l.wake, data); err != nil {
				return fmt.Errorf("wake consumer %s/%s: %w", ls.stream, name, err)
			}
		}
		select {
		case <-ws.all:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("wake consumers of %s: %w", ls.stream, context.Cause(ctx))
		case <-tick.C:
		}
		for name := range asleep {
			c, err := js.Consumer(ctx, ls.stream, name)
			if err != nil {
				continue
			}
			// A woken consumer delivers more than the wakes written to it.
			if ci, err := c.Info(ctx); err == nil && (ci.Delivered.Consumer > before[name]+1 || ci.NumPending == 0) {
				delete(asleep, name)
			}
		}
	}
	return nil
}

// duplicateInProcess reports nats-server's answer to a publish whose
// Nats-Msg-Id another publish to a replicated stream is committing right
// now (10158): the report is being stored, as a duplicate would have been.
// The ceiling's runtimes publish into its stream directly and meet it on a
// cluster; authbus's intake answers it for them.
func duplicateInProcess(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == 10158
}

// wakeKey is a credential key of the run that is never registered: a 401 for
// it wakes a resumed consumer (see runWaveTimed) and is terminated.
func wakeKey(k events.Key) events.Key {
	return events.Key{Tenant: k.Tenant, User: "wake", Server: k.Server}
}

const wakeFingerprint = "0000000000000000"

// publish401s is the runtimes' side of a wave: every runtime of every
// credential publishes a 401 through JetStream with the de-duplicating
// Nats-Msg-Id, runtime r of every credential in turn, each runtime starting
// at another credential. msg returns the subject, body and message id of
// credential i's 401.
func publish401s(ctx context.Context, cfg Config, js jetstream.JetStream, ws *waveState, n int, msg func(i int) (subject string, data []byte, id string, err error)) error {
	k := cfg.Credentials
	type one struct {
		subject, id string
		data        []byte
	}
	msgs := make([]one, k)
	for i := range k {
		s, d, id, err := msg(i)
		if err != nil {
			return err
		}
		msgs[i] = one{s, id, d}
	}
	var g errgroup.Group
	for p := range cfg.Publishers {
		g.Go(func() error {
			for j := p; j < k*n; j += cfg.Publishers {
				r := j / k
				i := (j%k + r*k/n) % k
				ws.started(i)
				_, err := js.Publish(ctx, msgs[i].subject, msgs[i].data, jetstream.WithMsgID(msgs[i].id))
				if err != nil && !duplicateInProcess(err) {
					return fmt.Errorf("publish 401 on %s: %w", msgs[i].subject, err)
				}
			}
			return nil
		})
	}
	return g.Wait()
}
