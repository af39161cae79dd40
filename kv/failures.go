package kv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
)

// Failure is a refresh of a credential that failed and is being retried:
// what a person needs to see while the credential's state still says
// active (a token endpoint that does not resolve, a server answering 503)
// and when the next attempt is due. It names the generation it belongs to
// (version and fingerprint), so that a later generation, or a credential
// deleted and registered again, never shows it: no write is needed when a
// refresh succeeds.
type Failure struct {
	Version     int64     `json:"version"`           // the generation whose refresh failed
	Fingerprint string    `json:"fingerprint"`       // of that generation's access token
	At          time.Time `json:"at"`                // when the attempt failed
	Cause       string    `json:"cause"`             // what failed, in words; never a token or secret
	Attempt     uint64    `json:"attempt"`           // the delivery of the event that failed, 1 for the first
	RetryAt     time.Time `json:"retry_at,omitzero"` // when the event is delivered again; zero when it is not
}

// FailuresConfig configures the failure bucket. Zero values mean the
// documented default.
type FailuresConfig struct {
	Bucket   string        // required
	Replicas int           // 0 means 1
	MaxAge   time.Duration // how long a note nobody renews is kept; 0 means 24h
}

// Failures keeps the last failed refresh of each credential, in a bucket
// of its own (one entry per credential key, no history) rather than in
// the credential record: a note is informational, written by whoever saw
// the failure, and must neither bump the record's revision nor take part
// in the compare-and-set that guards the tokens. Reading it needs no seal
// key (Inspector). Failures is safe for concurrent use.
type Failures struct {
	kv jetstream.KeyValue
}

// NewFailures creates the failure bucket, or brings an existing one up to
// cfg (its replica count stays what is deployed).
func NewFailures(ctx context.Context, js jetstream.JetStream, cfg FailuresConfig) (*Failures, error) {
	if cfg.Bucket == "" {
		return nil, errors.New("kv: failures config: Bucket is empty; set it to the failure bucket's name")
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	if cfg.MaxAge == 0 {
		cfg.MaxAge = 24 * time.Hour
	}
	bucket, err := provisionBucket(ctx, js, jetstream.KeyValueConfig{
		Bucket:      cfg.Bucket,
		Description: "authbus: the last failed refresh of each credential (no secrets)",
		History:     1,
		TTL:         cfg.MaxAge,
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, err
	}
	return &Failures{kv: bucket}, nil
}

// Record keeps f as the last failed refresh of k, replacing the previous.
func (fs *Failures) Record(ctx context.Context, k events.Key, f Failure) error {
	data, err := json.Marshal(f)
	if err != nil {
		return err
	}
	if _, err := fs.kv.Put(ctx, k.String(), data); err != nil {
		return fmt.Errorf("record the failed refresh of %s: %w", k, err)
	}
	return nil
}
