package workers_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// One tenant's backlog, far beyond what its share of the workers runs at
// once, waits in the refresher while its refreshes end quickly, instead of
// going back to the stream again and again: every event is refreshed, and
// the events handed back (tenant_busy) are counted against the backlog.
func TestOneTenantsBacklogWaitsWhileItsRefreshesEnd(t *testing.T) {
	const creds = 600
	b := fleet.Setup(t)
	b.AS.SetExpiresIn(3600)
	b.StartPools(t, 1, nil)
	keys := make([]events.Key, creds)
	fps := make([]string, creds)
	for i := range keys {
		keys[i] = fleet.MustKey(t, fmt.Sprintf("acme.u%d.github", i))
		fps[i] = b.Register(t, keys[i], b.AS.Issue(fleet.ClientID), nil).Fingerprint
	}
	b.StopPools(t)

	// The backlog, written while no refresher runs.
	for i, key := range keys {
		data, err := events.Encode(key, "test/backlog", events.Unauthorized{Fingerprint: fps[i], Runtime: "backlog", Status: 401})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.JS.PublishAsync(b.Subj.Work(events.Type401, key), data); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-b.JS.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		t.Fatal("the backlog was not written within 30s")
	}

	calls := b.AS.Calls()
	b.StartPools(t, 1, func(c *workers.Config) { c.MaxDeliver = 1000 })
	fleet.Eventually(t, 60*time.Second, "every credential of the backlog is refreshed", func() bool {
		return b.AS.Calls()-calls >= creds && fleet.QueueEmpty(b.JS, b.Subj)
	})
	outcomes := map[string]int{}
	again := 0 // handed back on a second or later delivery
	for _, rec := range b.Logs.Records(map[string]string{"msg": "event processed"}) {
		o := fmt.Sprint(rec["outcome"])
		outcomes[o]++
		if o == "tenant_busy" && fmt.Sprint(rec["attempt"]) != "1" {
			again++
		}
	}
	t.Logf("%d events of one tenant, one pool of 8 workers: outcomes %v (%d handed back again), %d token calls", creds, outcomes, again, b.AS.Calls()-calls)
	if outcomes["rotated"] != creds || b.AS.Calls()-calls != creds {
		t.Errorf("%d rotated with %d token calls, want %d of each", outcomes["rotated"], b.AS.Calls()-calls, creds)
	}
	// Its refreshes end within milliseconds: waiting costs less than a
	// round trip to the stream. Only the first moments, before any of them
	// ended, may hand events back, and an event handed back then waits in
	// the refresher when it returns (0 handed back again in runs; 292–435
	// when at most twice the worker count could wait).
	if again > creds/4 {
		t.Errorf("%d deliveries handed back again as tenant_busy for a backlog of %d (%d in all): the backlog went back to the stream over and over", again, creds, outcomes["tenant_busy"])
	}
}
