package egress

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
)

func TestPolicyAddresses(t *testing.T) {
	cases := []struct {
		addr                  string
		public, loopback, dev bool // allowed by: zero policy, AllowLoopback, AllowLoopback+AllowPrivate
	}{
		{"93.184.216.34", true, true, true},
		{"2606:4700::1111", true, true, true},
		{"127.0.0.1", false, true, true},
		{"127.9.9.9", false, true, true},
		{"::1", false, true, true},
		{"::ffff:127.0.0.1", false, true, true},
		{"10.1.2.3", false, false, true},
		{"172.16.0.1", false, false, true},
		{"192.168.1.1", false, false, true},
		{"100.64.0.1", false, false, true},
		{"fd00::1", false, false, true},
		{"::ffff:10.0.0.1", false, false, true},
		{"64:ff9b::a00:1", false, false, true}, // NAT64 of 10.0.0.1
		// IPv6 forms that lead to an IPv4 address are judged by it.
		{"::ffff:169.254.169.254", false, false, false},
		{"64:ff9b::a9fe:a9fe", false, false, false},             // NAT64 of the metadata service
		{"64:ff9b::808:808", true, true, true},                  // NAT64 of a public address
		{"64:ff9b:1::a9fe:a9fe", false, false, false},           // local-use NAT64, /96 layout
		{"64:ff9b:1:a9fe:a9:fe00::", false, false, false},       // local-use NAT64, /48 layout
		{"64:ff9b:1:a9fe:a9:fe00:808:808", false, false, false}, // /48 layout hiding behind a public /96 reading
		{"64:ff9b:1::808:808", true, true, true},                // local-use NAT64 of a public address (DNS64)
		{"64:ff9b:1::7f00:1", false, true, true},
		{"64:ff9b:1::a00:1", false, false, true},
		{"2002:a9fe:a9fe::1", false, false, false}, // 6to4 of the metadata service
		{"2002:7f00:1::1", false, true, true},
		{"2002:a00:1::1", false, false, true},
		{"2002:808:808::1", true, true, true},
		{"::a9fe:a9fe", false, false, false}, // IPv4-compatible
		{"::7f00:1", false, true, true},
		{"::a00:1", false, false, true},
		{"::ffff:0:a9fe:a9fe", false, false, false},                   // IPv4-translated
		{"2001:0:4136:e378:8000:63bf:5601:56fe", false, false, false}, // Teredo, client 169.254.169.1
		{"2001:0:4136:e378:8000:63bf:f7f7:f7f7", true, true, true},    // Teredo, client 8.8.8.8
		{"169.254.169.254", false, false, false},
		{"fe80::1", false, false, false},
		{"0.0.0.0", false, false, false},
		{"::", false, false, false},
		{"224.0.0.1", false, false, false},
		{"255.255.255.255", false, false, false},
		{"192.0.2.1", false, false, false},
	}
	for _, c := range cases {
		ip := netip.MustParseAddr(c.addr)
		for _, p := range []struct {
			name   string
			policy Policy
			want   bool
		}{
			{"zero", Policy{}, c.public},
			{"loopback", Policy{AllowLoopback: true}, c.loopback},
			{"loopback+private", Policy{AllowLoopback: true, AllowPrivate: true}, c.dev},
		} {
			err := p.policy.checkAddr(ip)
			if got := err == nil; got != p.want {
				t.Errorf("%s policy, %s: allowed=%v, want %v (err %v)", p.name, c.addr, got, p.want, err)
			}
			if err != nil && !errors.Is(err, ErrRefused) {
				t.Errorf("%s: error %v does not wrap ErrRefused", c.addr, err)
			}
		}
	}
}

func TestPolicyPatterns(t *testing.T) {
	p := Policy{Allowed: []string{"*.okta.com", "auth.example.com", "10.1.2.3"}}
	for host, want := range map[string]bool{
		"acme.okta.com":      true,
		"a.b.okta.com":       true,
		"ACME.Okta.com.":     true,
		"okta.com":           false,
		"evilokta.com":       false,
		"okta.com.evil.net":  false,
		"auth.example.com":   true,
		"x.auth.example.com": false,
		"10.1.2.3":           true,
		"10.1.2.4":           false,
	} {
		if got := p.matchHost(host); got != want {
			t.Errorf("matchHost(%q) = %v, want %v", host, got, want)
		}
	}
	if !(Policy{}).matchHost("anything.example") {
		t.Error("an empty allow-list refused a host")
	}
	for _, bad := range []string{"", "*", "*.", "http://x.com", "x.com:443", "a.*.com", ".x.com"} {
		if err := (Policy{Allowed: []string{bad}}).Validate(); err == nil {
			t.Errorf("pattern %q was accepted", bad)
		}
	}
}

func TestCheckEndpoint(t *testing.T) {
	ctx := context.Background()
	cases := []struct {
		policy   Policy
		endpoint string
		ok       bool
	}{
		{Policy{}, "https://93.184.216.34/token", true},
		{Policy{}, "http://127.0.0.1:8080/token", false},
		{Policy{AllowLoopback: true}, "http://127.0.0.1:8080/token", true},
		{Policy{}, "https://169.254.169.254/latest/meta-data", false},
		{Policy{}, "https://[fe80::1]/token", false},
		{Policy{}, "https://[64:ff9b:1::a9fe:a9fe]/token", false},
		{Policy{}, "https://[2002:a9fe:a9fe::1]/token", false},
		{Policy{}, "https://[::a9fe:a9fe]/token", false},
		{Policy{}, "https://[64:ff9b::808:808]/token", true},
		// A name is resolved: localhost resolves to loopback.
		{Policy{}, "http://localhost:8080/token", false},
		{Policy{AllowLoopback: true}, "http://localhost:8080/token", true},
		{Policy{Allowed: []string{"*.okta.com"}, AllowLoopback: true}, "http://127.0.0.1:8080/token", false},
		{Policy{}, "no host", false},
	}
	for _, c := range cases {
		err := c.policy.CheckEndpoint(ctx, c.endpoint)
		if (err == nil) != c.ok {
			t.Errorf("%+v %s: err %v, want ok=%v", c.policy, c.endpoint, err, c.ok)
		}
		if err != nil && !errors.Is(err, ErrRefused) {
			t.Errorf("%s: error %v does not wrap ErrRefused", c.endpoint, err)
		}
	}
}

// The address check runs on the address actually dialed: a name that
// passes the pattern check is still refused when it resolves to loopback.
func TestDialerChecksResolvedAddress(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()

	dial := Policy{Allowed: []string{"localhost"}}.dialContext(log)
	if c, err := dial(ctx, "tcp", net.JoinHostPort("localhost", port)); err == nil {
		c.Close()
		t.Fatal("dialing localhost (loopback) was allowed by a policy without AllowLoopback")
	} else if !errors.Is(err, ErrRefused) {
		t.Fatalf("dial error %v does not wrap ErrRefused", err)
	}
	if _, err := dial(ctx, "tcp", net.JoinHostPort("127.0.0.1", port)); !errors.Is(err, ErrRefused) {
		t.Fatalf("host outside the allow-list: err %v, want ErrRefused", err)
	}

	dial = Policy{AllowLoopback: true}.dialContext(log)
	c, err := dial(ctx, "tcp", net.JoinHostPort("localhost", port))
	if err != nil {
		t.Fatalf("loopback allowed, dial: %v", err)
	}
	c.Close()
}
