package kv

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
)

// BucketStream returns the name of the stream behind the KV bucket named
// bucket ("KV_AUTH_CREDENTIALS"): the name JetStream's key-value layer
// gives it, for reading the stream itself (leader reads, replication).
func BucketStream(bucket string) string { return "KV_" + bucket }

// provisionBucket creates the bucket with cfg, or brings an existing one up
// to cfg with one exception: the replica count stays what is deployed.
// Replicas are the deployment's, not the last starter's: a refresher
// started with the default of 1 must not scale a replicated deployment
// down, and one started with 3 must not change a deployment under the
// refreshers already running on it. cfg.Replicas applies only when the
// bucket is created; Replicas on the Store or Leases reports what is
// deployed, so a caller can say when the two differ.
func provisionBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	for attempt := 1; ; attempt++ {
		stream, err := js.Stream(ctx, BucketStream(cfg.Bucket))
		switch {
		case err == nil:
			cfg.Replicas = stream.CachedInfo().Config.Replicas
			bucket, err := js.UpdateKeyValue(ctx, cfg)
			if err != nil {
				return nil, fmt.Errorf("kv: update bucket %s: %w; check that the NATS user may manage JetStream streams", cfg.Bucket, err)
			}
			return bucket, nil
		case !errors.Is(err, jetstream.ErrStreamNotFound):
			return nil, fmt.Errorf("kv: look up bucket %s: %w", cfg.Bucket, err)
		}
		bucket, err := js.CreateKeyValue(ctx, cfg)
		if errors.Is(err, jetstream.ErrBucketExists) && attempt == 1 {
			continue // another refresher created it meanwhile: follow it
		}
		if err != nil {
			return nil, fmt.Errorf("kv: create bucket %s: %w; check that the NATS user may manage JetStream streams", cfg.Bucket, err)
		}
		return bucket, nil
	}
}
