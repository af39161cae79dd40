package kv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
)

// The fence: a refresher presents the refresh token of the record it acts
// on, and must never present one a peer already redeemed. A peer that
// redeemed it stored the new record (under its lease) before it released
// the lease, so a refresher that holds the lease and acts on a read that
// saw every write acknowledged before its claim is safe. Two things give
// such a read:
//
//   - the claim proves the read made before it current (see claimProves),
//     which spares a round trip on most refreshes; or
//   - Fence reads the record again from the credential stream's leader.
//
// Why the leader: a KV get is a JetStream direct get, which any replica
// that joined the stream's direct-get group may answer, and nats-server
// lets a follower join once it is 90 % caught up and keeps it there when it
// falls behind. Measured on a 3-node cluster with one slowed node, direct
// gets one round trip after an acknowledged write returned the older
// revision in 440 of 2 000 reads. The non-direct message-get API is
// answered by the stream leader only, and a leader answers only once it has
// applied every entry committed before it took over.

// A Read is what a refresher learned from reading a credential before
// claiming its lease: the revision it saw, when the read was sent, and
// whether the answer came from the only server that holds the bucket. Pass
// it to Leases.Claim, which decides whether the read is still current. The
// zero Read is "nothing read": a claim proves nothing about it.
type Read struct {
	Revision uint64
	at       time.Time
	single   bool // answered by the one standalone server that holds the bucket
	leader   bool // answered by the stream leader (LoadLatest)
}

// Current reports whether the read saw every write acknowledged before it
// was sent: it came from the one standalone server that holds the bucket,
// or from the stream leader. A read that is not may be older than what a
// runtime already holds: decisions that turn an event away (stale, needs a
// new login) must not rest on it.
func (r Read) Current() bool { return r.single || r.leader }

// Load reads the credential of k as Get does, for a refresher about to
// claim its lease: the Read it returns tells the claim what was read.
func (s *Store) Load(ctx context.Context, k events.Key) (*Credential, Read, error) {
	at := time.Now()
	c, rev, err := s.Get(ctx, k)
	if err != nil {
		return nil, Read{}, err
	}
	// Checked after the answer: the connection that carried it is to the
	// standalone server that holds the bucket, so no follower answered.
	return c, Read{Revision: rev, at: at, single: s.standalone()}, nil
}

// LoadLatest is Load from the credential stream's leader (see Latest).
func (s *Store) LoadLatest(ctx context.Context, k events.Key) (*Credential, Read, error) {
	at := time.Now()
	c, rev, err := s.Latest(ctx, k)
	if err != nil {
		return nil, Read{}, err
	}
	return c, Read{Revision: rev, at: at, single: s.standalone(), leader: true}, nil
}

// standalone reports whether the connection is to the standalone server
// (no cluster) that holds the bucket: then every read is answered by the
// one copy there is, and it has every acknowledged write.
func (s *Store) standalone() bool {
	return s.host != "" && s.nc.ConnectedClusterName() == "" && s.nc.ConnectedServerName() == s.host
}

// Latest reads the credential of k from the credential stream's leader:
// unlike Get, whose direct read any replica may answer, it sees every write
// acknowledged before it was sent. It costs about twice a Get on one server
// and is the read that decides which refresh token to present.
func (s *Store) Latest(ctx context.Context, k events.Key) (*Credential, uint64, error) {
	if err := k.Validate(); err != nil {
		return nil, 0, err
	}
	return s.latest(ctx, k, nil, 0)
}

// latest is Latest that returns known itself, without decoding, when the
// leader still holds revision knownRev.
func (s *Store) latest(ctx context.Context, k events.Key, known *Credential, knownRev uint64) (*Credential, uint64, error) {
	msg, err := leaderGet(ctx, s.nc, s.api, s.stream, s.subPrefix+k.String(), false)
	if err != nil {
		return nil, 0, fmt.Errorf("get credential %s from the stream leader: %w", k, err)
	}
	if known != nil && msg.Sequence == knownRev {
		return known, knownRev, nil
	}
	c, err := decodeCredential(s.ring, k, msg.Data)
	if err != nil {
		return nil, 0, fmt.Errorf("get credential %s (revision %d): %w", k, msg.Sequence, err)
	}
	return c, msg.Sequence, nil
}

// Fence returns the credential a refresh that holds l may act on, and its
// revision: c itself (what the caller loaded before claiming l) when the
// claim proved that read current, otherwise the record as the credential
// stream's leader holds it now (decoded only when it changed). Compare the
// revision with the one loaded to learn whether someone wrote meanwhile.
func (s *Store) Fence(ctx context.Context, l *Lease, c *Credential) (*Credential, uint64, error) {
	if l.current {
		return c, l.read.Revision, nil
	}
	return s.latest(ctx, l.key, c, l.read.Revision)
}

// UpdateUnder is Update for a holder of l, retried through short NATS
// outages for up to the lease TTL: the tokens it stores come from a refresh
// token already redeemed, and a KV leader election can take seconds. It
// records in l the revision written, so the lease's release states it for
// the next claimer; until the write answers, and after a conflict (someone
// else wrote), l states nothing, since a write that timed out may still
// land.
func (s *Store) UpdateUnder(ctx context.Context, l *Lease, c *Credential, rev uint64) (uint64, error) {
	l.leaves(0)
	deadline := time.Now().Add(l.leases.ttl)
	for i := 0; ; i++ {
		nrev, err := s.Update(ctx, c, rev)
		if err == nil {
			l.leaves(nrev)
			return nrev, nil
		}
		if errors.Is(err, ErrConflict) {
			return 0, err
		}
		wait := min(time.Duration(100<<min(i, 4))*time.Millisecond, time.Second)
		if time.Now().Add(wait).After(deadline) {
			return 0, err
		}
		if serr := sleepCtx(ctx, wait); serr != nil {
			return 0, err
		}
	}
}

// leaderRequestTimeout bounds a leader get whose context has no deadline.
const leaderRequestTimeout = 5 * time.Second

// leaderGet reads the last message of subject in stream with the
// non-direct message-get API, which only the stream leader answers (nats.go
// uses direct gets whenever a stream allows them, as KV streams do). A
// subject without messages is ErrNotFound, and so is one whose last message
// is a KV delete or purge marker unless markers is true.
func leaderGet(ctx context.Context, nc *nats.Conn, api, stream, subject string, markers bool) (*jetstream.RawStreamMsg, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, leaderRequestTimeout)
		defer cancel()
	}
	req, err := json.Marshal(struct {
		LastFor string `json:"last_by_subj"`
	}{subject})
	if err != nil {
		return nil, err
	}
	resp, err := nc.RequestWithContext(ctx, api+"STREAM.MSG.GET."+stream, req)
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) {
			return nil, fmt.Errorf("%w: no JetStream answers for stream %s; check that JetStream runs and the stream has a leader", err, stream)
		}
		return nil, err
	}
	var r struct {
		Error   *jetstream.APIError `json:"error"`
		Message *struct {
			Subject  string    `json:"subject"`
			Sequence uint64    `json:"seq"`
			Header   []byte    `json:"hdrs"`
			Data     []byte    `json:"data"`
			Time     time.Time `json:"time"`
		} `json:"message"`
	}
	if err := json.Unmarshal(resp.Data, &r); err != nil {
		return nil, fmt.Errorf("message get on %s: undecodable answer: %w", stream, err)
	}
	if r.Error != nil {
		if r.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return nil, ErrNotFound
		}
		return nil, r.Error
	}
	if r.Message == nil {
		return nil, fmt.Errorf("message get on %s: %w", stream, jetstream.ErrInvalidJetStreamResponse)
	}
	msg := &jetstream.RawStreamMsg{Subject: r.Message.Subject, Sequence: r.Message.Sequence, Data: r.Message.Data, Time: r.Message.Time}
	if len(r.Message.Header) > 0 {
		if msg.Header, err = nats.DecodeHeadersMsg(r.Message.Header); err != nil {
			return nil, fmt.Errorf("message get on %s: headers: %w", stream, err)
		}
		if !markers && isMarker(msg.Header) {
			return nil, ErrNotFound
		}
	}
	return msg, nil
}

// standaloneHost returns the name of the server that holds stream when it
// is a standalone server (not part of a cluster) reached without a
// JetStream domain or API prefix, and "" otherwise: only then can a read
// be shown to come from the one copy there is.
func standaloneHost(js jetstream.JetStream, stream jetstream.Stream) string {
	if apiPrefix(js.Options()) != jetstream.DefaultAPIPrefix {
		return ""
	}
	ci := stream.CachedInfo().Cluster
	if ci == nil || ci.Name != "" || len(ci.Replicas) > 0 {
		return ""
	}
	return ci.Leader
}
