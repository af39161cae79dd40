package workers_test

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// Idle keep-alive connections of the shared HTTP transport end
		// with their server; the runtime may not have reaped them yet.
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
		// nats.go's async-publish watcher ends when its connection reports
		// CLOSED; one started in the instant between a killed worker's
		// IsClosed check and its publish never hears it (the fault tests
		// close connections under running refreshes on purpose).
		goleak.IgnoreTopFunction("github.com/nats-io/nats.go/jetstream.(*jetStream).resetPendingAcksOnReconnect"),
	)
}
