package main

import (
	"bytes"
	"slices"
	"strings"
	"testing"
)

// The SSRF flags reach the pool's policy; loopback is allowed only in the
// embedded dev mode unless asked for.
func TestTokenHostFlags(t *testing.T) {
	o, err := parseFlags([]string{"--allowed-token-hosts", "*.okta.com, auth.example.com", "--allow-private-token-hosts"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	p := o.sec.tokenHosts(false)
	if !slices.Equal(p.Allowed, []string{"*.okta.com", "auth.example.com"}) || !p.AllowPrivate || p.AllowLoopback {
		t.Errorf("joining a deployment: policy %+v", p)
	}
	if !o.sec.tokenHosts(true).AllowLoopback {
		t.Error("the embedded dev mode refuses loopback token endpoints: the README quick start breaks")
	}
	// With users configured (tenants), loopback is refused in the embedded
	// mode too: any tenant could make the refresher call a service on its
	// own machine and read parts of the answer back. The flag allows it.
	withUsers, err := parseFlags([]string{"--nats-config", "users.conf"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if withUsers.sec.tokenHosts(true).AllowLoopback {
		t.Error("the embedded mode with --nats-config allows loopback token endpoints")
	}
	withUsers, err = parseFlags([]string{"--nats-config", "users.conf", "--allow-loopback-token-hosts"}, &bytes.Buffer{})
	if err != nil || !withUsers.sec.tokenHosts(true).AllowLoopback {
		t.Errorf("--allow-loopback-token-hosts with --nats-config: %v", err)
	}
	t.Setenv("AUTHBUS_ALLOWED_TOKEN_HOSTS", "*.auth0.com")
	o, err = parseFlags(nil, &bytes.Buffer{})
	if err != nil || !slices.Equal(o.sec.tokenHosts(false).Allowed, []string{"*.auth0.com"}) {
		t.Errorf("AUTHBUS_ALLOWED_TOKEN_HOSTS: %+v %v", o.sec.tokenHosts(false), err)
	}

	var help bytes.Buffer
	_, _ = parseFlags([]string{"--help"}, &help)
	for _, want := range []string{"allowed-token-hosts", "allow-private-token-hosts", "nats-config", "NATS_USER", "refresher keys", "refresher permissions"} {
		if !strings.Contains(help.String(), want) {
			t.Errorf("--help does not mention %s", want)
		}
	}
}
