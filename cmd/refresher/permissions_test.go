package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
)

func permissionsBlock(t *testing.T, args ...string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	if err := runPermissions(args, &out, &errOut); err != nil {
		t.Fatalf("refresher permissions %s: %v\n%s", strings.Join(args, " "), err, errOut.String())
	}
	return out.String()
}

func TestPermissionsRefusesBadInput(t *testing.T) {
	for _, args := range [][]string{
		nil,
		{"--tenant", "acme.*"},
		{"--tenant", ">"},
		{"--tenant", "acme", "--refresher"},
		{"--tenant", "acme", "--password-env", "NOT-A-VAR"},
	} {
		if err := runPermissions(args, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
			t.Errorf("permissions %q was accepted", args)
		}
	}
}

// Internal names are refused as tenants, and a tenant cannot be given an
// internal user's name or password variable: each would log the tenant in
// with the rights of the deployment's own users.
func TestPermissionsRefusesReservedNames(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--tenant", "refresher"}, "reserved"},
		{[]string{"--tenant", "Refresher"}, "reserved"},
		{[]string{"--tenant", "operator"}, "reserved"},
		{[]string{"--tenant", "STORM"}, "reserved"},
		{[]string{"--tenant", "admin"}, "reserved"},
		{[]string{"--tenant", "authbus"}, "reserved"},
		{[]string{"--tenant", "sys"}, "reserved"},
		{[]string{"--tenant", "acme", "--password-env", "AUTHBUS_PASSWORD_REFRESHER"}, "password variable"},
		{[]string{"--tenant", "acme", "--user", "authbus-refresher"}, "name of the deployment's"},
		{[]string{"--tenant", "acme", "--user", "admin"}, "name of the deployment's"},
	} {
		err := runPermissions(c.args, &bytes.Buffer{}, &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("permissions %q: err %v, want one saying %q", c.args, err, c.want)
		}
	}
}

// The tenant names the review found sharing a variable get distinct ones;
// the readable form of the common names is what it always was.
func TestPasswordVarDistinct(t *testing.T) {
	for tenant, want := range map[string]string{
		"acme":      "AUTHBUS_PASSWORD_ACME",
		"acme-corp": "AUTHBUS_PASSWORD_ACME_CORP",
		"a-b":       "AUTHBUS_PASSWORD_A_B",
		"a_b":       "AUTHBUS_PASSWORD__A_0B",
		"Acme":      "AUTHBUS_PASSWORD___ACME",
		"-x":        "AUTHBUS_PASSWORD____X",
		"1a":        "AUTHBUS_PASSWORD_1A",
	} {
		if got := passwordVar(tenant); got != want {
			t.Errorf("passwordVar(%q) = %s, want %s", tenant, got, want)
		}
	}
	for _, pair := range [][2]string{{"a-b", "a_b"}, {"Acme", "acme"}, {"--0", "_"}, {"-acme", "acme"}} {
		if a, b := passwordVar(pair[0]), passwordVar(pair[1]); a == b {
			t.Errorf("tenants %q and %q share the password variable %s", pair[0], pair[1], a)
		}
	}
	for _, r := range reservedTenants {
		for _, tenant := range []string{r, strings.ToUpper(r)} {
			if err := checkTenant(tenant); err == nil {
				t.Errorf("reserved name %q was accepted as a tenant", tenant)
			}
		}
	}
}

// decodePasswordVar reads a tenant back from its password variable,
// following the --help text; ok is false for a variable no tenant has.
// Every variable reading back to its tenant proves the encoding injective.
func decodePasswordVar(v string) (tenant string, ok bool) {
	s, ok := strings.CutPrefix(v, "AUTHBUS_PASSWORD_")
	if !ok || s == "" {
		return "", false
	}
	esc, escaped := strings.CutPrefix(s, "_")
	if !escaped {
		return strings.ToLower(strings.ReplaceAll(s, "_", "-")), true
	}
	var sb strings.Builder
	for i := 0; i < len(esc); i++ {
		c := esc[i]
		switch {
		case c != '_':
			sb.WriteByte(byte(unicode.ToLower(rune(c))))
		case i+1 == len(esc):
			return "", false
		default:
			i++
			switch n := esc[i]; {
			case n == '_':
				sb.WriteByte('-')
			case n == '0':
				sb.WriteByte('_')
			case n >= 'A' && n <= 'Z':
				sb.WriteByte(n)
			default:
				return "", false
			}
		}
	}
	return sb.String(), true
}

func FuzzPasswordVar(f *testing.F) {
	for _, s := range []string{"acme", "a-b", "a_b", "Acme", "ACME", "-", "_", "--0", "a__b", "refresher", "x9-Y_z"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, tenant string) {
		if (events.Key{Tenant: tenant, User: "x", Server: "x"}).Validate() != nil {
			return
		}
		v := passwordVar(tenant)
		if !envName.MatchString(v) {
			t.Fatalf("passwordVar(%q) = %q is not a variable name", tenant, v)
		}
		if back, ok := decodePasswordVar(v); !ok || back != tenant {
			t.Fatalf("passwordVar(%q) = %s reads back as %q (%v): two tenants could share it", tenant, v, back, ok)
		}
	})
}

// tenantConn is a runtime of one tenant, connected as the tenant's user.
// The printed blocks, loaded by the embedded server through --nats-config,
// isolate tenants: A's user registers, publishes 401s, reads tokens and
// watches its own keys, with its own inbox prefix and with the refreshers
// running as their own users; it can neither publish, request nor
// subscribe on B's subjects, nor on everyone's at once.
func TestTenantPermissions(t *testing.T) {
	d := startTenantDeployment(t, nil)
	if _, err := nats.Connect(d.ns.ClientURL()); err == nil {
		t.Fatal("an anonymous connection was accepted: the config's users are not in force")
	}
	a, b, as, subj, logs := d.a, d.b, d.as, d.subj, d.logs
	register := func(c *tenantConn, key events.Key) (events.RegisterReply, error) { return d.register(t, c, key, nil) }
	aKey, bKey := fleet.MustKey(t, "acme.alice.github"), fleet.MustKey(t, "bravo.bob.github")

	// A watches its own rotations, and tries to watch B's and everyone's.
	rotated := make(chan *nats.Msg, 16)
	if _, err := a.nc.ChanSubscribe("auth.rotated.acme.>", rotated); err != nil {
		t.Fatal(err)
	}
	stolen := make(chan *nats.Msg, 16)
	for _, s := range []string{"auth.rotated.bravo.>", "auth.rotated.>", "auth.token.>", "_INBOX_bravo.>"} {
		if _, err := a.nc.ChanSubscribe(s, stolen); err != nil {
			t.Fatal(err)
		}
	}
	bRotated := make(chan *nats.Msg, 16)
	if _, err := b.nc.ChanSubscribe("auth.rotated.bravo.>", bRotated); err != nil {
		t.Fatal(err)
	}
	if err := a.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}

	// A's own key: register, rotated v1, 401 through JetStream, rotated v2, token.
	reg, err := register(a, aKey)
	if err != nil || reg.Version != 1 {
		t.Fatalf("A registers its own key: %+v %v", reg, err)
	}
	waitRotated(t, rotated, 1)
	data, _ := events.Encode(aKey, "test/a", events.Unauthorized{Fingerprint: reg.Fingerprint, Runtime: "a"})
	pubCtx, pubCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer pubCancel()
	if _, err := a.js.Publish(pubCtx, subj.Event(events.Type401, aKey), data,
		jetstream.WithMsgID(events.MsgID(events.Type401, aKey, reg.Fingerprint))); err != nil {
		t.Fatalf("A publishes a 401 for its own key through JetStream: %v", err)
	}
	waitRotated(t, rotated, 2)
	msg, err := a.nc.Request(subj.Token(aKey), nil, 5*time.Second)
	if err != nil || msg.Header.Get("Nats-Service-Error-Code") != "" {
		t.Fatalf("A reads its own token: %v %s", err, msg.Data)
	}

	// B registers its key and sees its rotation; A sees none of it.
	if _, err := register(b, bKey); err != nil {
		t.Fatalf("B registers: %v", err)
	}
	waitRotated(t, bRotated, 1)
	if err := a.nc.Flush(); err != nil {
		t.Fatal(err)
	}

	// A on B's subjects: every publish and request is refused by the server.
	short := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 500*time.Millisecond)
	}
	c1, cancel1 := short()
	defer cancel1()
	if _, err := a.js.Publish(c1, subj.Event(events.Type401, bKey), data); err == nil {
		t.Error("A published a 401 on B's key")
	}
	for _, s := range []string{subj.Token(bKey), subj.Register(bKey)} {
		if _, err := a.nc.Request(s, []byte("{}"), 500*time.Millisecond); err == nil {
			t.Errorf("A's request on %s was answered", s)
		}
	}
	if err := a.nc.Publish(subj.Event(events.TypeRotated, bKey), []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if err := a.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	fleet.Eventually(t, 5*time.Second, "the server reports every violation to A", func() bool {
		return a.denied(`Publish to "auth.401.bravo.bob.github"`) &&
			a.denied(`Publish to "auth.token.bravo.bob.github"`) &&
			a.denied(`Publish to "auth.register.bravo.bob.github"`) &&
			a.denied(`Publish to "auth.rotated.bravo.bob.github"`) &&
			a.denied(`Subscription to "auth.rotated.bravo.>"`) &&
			a.denied(`Subscription to "auth.rotated.>"`) &&
			a.denied(`Subscription to "auth.token.>"`) &&
			a.denied(`Subscription to "_INBOX_bravo.>"`)
	})
	if n := len(stolen); n != 0 {
		t.Errorf("A received %d messages on subjects it may not read", n)
	}
	select {
	case m := <-bRotated:
		t.Errorf("B saw a rotated event A forged: %s", m.Data)
	default:
	}
	if c := as.Calls(); c != 1 {
		t.Errorf("token calls %d, want 1 (A's own 401)", c)
	}
	// The refresher user may do all that a refresher does.
	for _, rec := range logs.Records(nil) {
		if rec["level"] != "INFO" && rec["level"] != "DEBUG" {
			t.Errorf("refresher logged %v: %v", rec["level"], rec)
		}
	}
}

func waitRotated(t *testing.T, ch <-chan *nats.Msg, version int64) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case m := <-ch:
			var ev struct {
				Data events.Rotated `json:"data"`
			}
			if err := json.Unmarshal(m.Data, &ev); err != nil {
				t.Fatalf("rotated event: %v", err)
			}
			if ev.Data.Version == version {
				return
			}
		case <-deadline:
			t.Fatalf("no auth.rotated version %d within 10s", version)
		}
	}
}
