// Package egress decides which hosts and addresses a refresher may send
// requests to: token endpoints and issuers' metadata, whose URLs come from
// runtimes. Without it a runtime could register a "token endpoint" on the
// cloud metadata service or an internal admin port and make the refreshers
// call it, with a client secret, and read parts of the answer back in an
// error. A Policy checks a URL when it is registered and, through the
// dialer of the HTTP client it builds, every address actually dialed; that
// client is direct (no proxy) and follows no redirect.
package egress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"time"
)

// ErrRefused marks a token endpoint that a Policy does not allow: a host
// outside the allowed patterns, or one that resolves to a loopback,
// private, link-local or otherwise non-public address. A registration
// naming such an endpoint is refused (400); a refusal at connect time (the
// name now resolves elsewhere) is logged and retried as a transient
// failure, never turned into needs_reauth: the refresh token was not sent,
// and only an operator (allow-list, DNS) can fix it.
var ErrRefused = errors.New("token endpoint host refused")

// Policy says which token endpoints (and issuers) a pool may call.
// Registration data comes from runtimes, so without it a runtime could make
// the refreshers send requests (with a client secret) to the metadata
// service or an internal admin port. The check runs on every connection, on
// the address actually dialed, because a name can resolve to something else
// after it was registered (DNS rebinding). The zero value allows any host
// whose addresses are public. It is a plain value, safe for concurrent use
// once built.
type Policy struct {
	// Allowed lists host patterns a token endpoint must match: an exact
	// host ("auth.example.com", "10.1.2.3") or "*." and a domain
	// ("*.okta.com", which matches any name under okta.com but not
	// okta.com itself). Matching ignores case and the port. Empty means
	// any host.
	Allowed []string
	// AllowLoopback permits 127.0.0.0/8 and ::1: the embedded dev mode,
	// where the README's test server runs on localhost, and tests.
	AllowLoopback bool
	// AllowPrivate permits private and shared address space (10/8,
	// 172.16/12, 192.168/16, 100.64/10, fc00::/7): an authorization server
	// inside the network. Link-local addresses (169.254/16 with the cloud
	// metadata service, fe80::/10), unspecified, multicast and reserved
	// addresses are always refused.
	//
	// An IPv6 address that leads to an IPv4 one (IPv4-mapped, NAT64 with
	// the well-known or a local-use prefix, 6to4, Teredo, IPv4-compatible
	// or -translated) is refused when that IPv4 address is.
	AllowPrivate bool
}

// Validate reports malformed patterns in Allowed, all of them at once.
func (p Policy) Validate() error {
	var errs []error
	for _, pat := range p.Allowed {
		name := strings.TrimPrefix(pat, "*.")
		if name == "" || strings.ContainsAny(name, "*/:@ ") || strings.HasPrefix(name, ".") || strings.HasSuffix(name, ".") {
			errs = append(errs, fmt.Errorf("TokenHosts.Allowed: pattern %q is not a host or *.domain; use e.g. auth.example.com or *.okta.com", pat))
		}
	}
	return errors.Join(errs...)
}

// matchHost reports whether host is allowed by the patterns.
func (p Policy) matchHost(host string) bool {
	if len(p.Allowed) == 0 {
		return true
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	for _, pat := range p.Allowed {
		pat = strings.ToLower(pat)
		if domain, ok := strings.CutPrefix(pat, "*."); ok {
			if strings.HasSuffix(host, "."+domain) {
				return true
			}
		} else if host == pat {
			return true
		}
	}
	return false
}

// checkHost refuses a host name outside the allowed patterns.
func (p Policy) checkHost(host string) error {
	if !p.matchHost(host) {
		return fmt.Errorf("%w: host %q matches none of the allowed token hosts (%s); add it to --allowed-token-hosts (TokenHosts.Allowed)",
			ErrRefused, host, strings.Join(p.Allowed, ", "))
	}
	return nil
}

// Address ranges that netip does not name. Shared address space and the
// benchmark range are as internal as RFC 1918 space.
var (
	privateExtra = []netip.Prefix{
		netip.MustParsePrefix("100.64.0.0/10"),
		netip.MustParsePrefix("198.18.0.0/15"),
	}
	reserved = []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/8"),
		netip.MustParsePrefix("192.0.0.0/24"),
		netip.MustParsePrefix("192.0.2.0/24"),
		netip.MustParsePrefix("198.51.100.0/24"),
		netip.MustParsePrefix("203.0.113.0/24"),
		netip.MustParsePrefix("240.0.0.0/4"), // includes 255.255.255.255
		netip.MustParsePrefix("2001:db8::/32"),
		netip.MustParsePrefix("fec0::/10"),
	}
	// Prefixes whose addresses carry an IPv4 address the packets end up
	// at: a refused IPv4 address must stay refused in each of these forms.
	nat64      = netip.MustParsePrefix("64:ff9b::/96")    // RFC 6052 well-known prefix
	nat64Local = netip.MustParsePrefix("64:ff9b:1::/48")  // RFC 8215 local-use, any RFC 6052 length
	sixToFour  = netip.MustParsePrefix("2002::/16")       // RFC 3056
	teredo     = netip.MustParsePrefix("2001::/32")       // RFC 4380
	v4Compat   = netip.MustParsePrefix("::/96")           // RFC 4291 §2.5.5.1, deprecated
	v4Xlat     = netip.MustParsePrefix("::ffff:0:0:0/96") // RFC 2765 IPv4-translated
)

// embeddedIPv4 returns the IPv4 addresses an IPv6 address leads to: a
// NAT64 translator, a 6to4 or Teredo relay, or an old stack delivers such a
// packet to the IPv4 address inside, so the policy must judge that one.
//
// A local-use NAT64 address (RFC 8215) may follow any RFC 6052 layout, and
// which one depends on the translator. DNS64 writes the IPv4 address in the
// last 32 bits (the /96 layout): that one is judged in full. The /48, /56
// and /64 layouts are returned as alternates: in a /96 address they read
// as bytes of the prefix and the address (0.0.0.0, 0.0.0.8, …), which no
// translator forwards, so an alternate is refused only when it is an
// address one would forward (loopback, link-local, private): the metadata
// service written in the /48 layout stays refused.
func embeddedIPv4(ip netip.Addr) (judged, alternates []netip.Addr) {
	if !ip.Is6() || ip.Is4In6() {
		return nil, nil
	}
	b := ip.As16()
	v4 := func(x ...byte) netip.Addr { return netip.AddrFrom4([4]byte(x)) }
	switch {
	case nat64.Contains(ip):
		return []netip.Addr{v4(b[12:]...)}, nil
	case nat64Local.Contains(ip):
		// RFC 6052 §2.2: bits 64–71 are skipped.
		return []netip.Addr{v4(b[12:]...)}, []netip.Addr{
			v4(b[6], b[7], b[9], b[10]),  // /48
			v4(b[7], b[9], b[10], b[11]), // /56
			v4(b[9:13]...),               // /64
		}
	case sixToFour.Contains(ip):
		return []netip.Addr{v4(b[2:6]...)}, nil
	case teredo.Contains(ip):
		// The Teredo server, and the client's address stored inverted.
		return []netip.Addr{v4(b[4:8]...), v4(^b[12], ^b[13], ^b[14], ^b[15])}, nil
	case v4Xlat.Contains(ip):
		return []netip.Addr{v4(b[12:]...)}, nil
	case v4Compat.Contains(ip) && ip != netip.IPv6Loopback() && ip != netip.IPv6Unspecified():
		// ::1 and :: are IPv6's own loopback and unspecified addresses,
		// judged as such.
		return []netip.Addr{v4(b[12:]...)}, nil
	}
	return nil, nil
}

// checkAddr refuses an address the policy does not allow: the address
// itself and, for an IPv6 address that embeds an IPv4 one (IPv4-mapped,
// NAT64, 6to4, Teredo, IPv4-compatible or -translated), every IPv4 address
// it may lead to.
func (p Policy) checkAddr(ip netip.Addr) error {
	ip = ip.Unmap()
	if err := p.checkOne(ip); err != nil {
		return err
	}
	judged, alternates := embeddedIPv4(ip)
	for _, v4 := range alternates {
		if v4.IsUnspecified() || v4.IsMulticast() || inAny(reserved, v4) {
			continue // not a destination; see embeddedIPv4
		}
		judged = append(judged, v4)
	}
	for _, v4 := range judged {
		if err := p.checkOne(v4); err != nil {
			return fmt.Errorf("address %s leads to %s: %w", ip, v4, err)
		}
	}
	return nil
}

func inAny(ps []netip.Prefix, ip netip.Addr) bool {
	for _, pf := range ps {
		if pf.Contains(ip) {
			return true
		}
	}
	return false
}

// checkOne refuses an address by its own kind.
func (p Policy) checkOne(ip netip.Addr) error {
	refuse := func(kind, fix string) error {
		return fmt.Errorf("%w: address %s is %s; %s", ErrRefused, ip, kind, fix)
	}
	switch {
	case !ip.IsValid():
		return refuse("not an IP address", "check the token endpoint")
	case ip.IsLoopback():
		if !p.AllowLoopback {
			return refuse("loopback", "a token endpoint on localhost is allowed only in the embedded dev mode (TokenHosts.AllowLoopback)")
		}
	case ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast():
		return refuse("link-local (e.g. a cloud metadata service)", "token endpoints there are never allowed")
	case ip.IsUnspecified() || ip.IsMulticast() || ip.IsInterfaceLocalMulticast() || inAny(reserved, ip):
		return refuse("unspecified, multicast or reserved", "token endpoints there are never allowed")
	case ip.IsPrivate() || inAny(privateExtra, ip):
		if !p.AllowPrivate {
			return refuse("private", "to call an authorization server inside the network set --allow-private-token-hosts (TokenHosts.AllowPrivate)")
		}
	}
	return nil
}

// registrationLookupTimeout bounds the DNS lookup at registration. A lookup
// that fails or times out does not refuse the registration: the check at
// connect time is the one that counts, and a registration should not
// depend on a resolver's bad minute.
const registrationLookupTimeout = 2 * time.Second

// CheckEndpoint checks a token endpoint URL at registration: its host must
// match the allowed patterns, an IP literal must be an allowed address, and
// every address a host name resolves to now must be allowed. Errors wrap
// ErrRefused and say what to change.
func (p Policy) CheckEndpoint(ctx context.Context, endpoint string) error {
	u, err := url.Parse(endpoint)
	if err != nil || u.Hostname() == "" {
		return fmt.Errorf("%w: token endpoint %q has no host; send an absolute https URL", ErrRefused, endpoint)
	}
	host := u.Hostname()
	if err := p.checkHost(host); err != nil {
		return err
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return p.checkAddr(ip)
	}
	ctx, cancel := context.WithTimeout(ctx, registrationLookupTimeout)
	defer cancel()
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil
	}
	for _, ip := range ips {
		if err := p.checkAddr(ip); err != nil {
			return fmt.Errorf("token endpoint host %q resolves to a refused address: %w", host, err)
		}
	}
	return nil
}

// dialContext returns a DialContext for an http.Transport that enforces the
// policy at connect time: the host name against the patterns before it is
// resolved, and each resolved address in the dialer's Control hook, right
// before the socket connects, so no later DNS answer can slip past. Refusals
// are logged here, where host and address are both known.
func (p Policy) dialContext(log *slog.Logger) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("token endpoint address %q: %w", addr, err)
		}
		if err := p.checkHost(host); err != nil {
			log.Warn("token endpoint refused at connect time", "host", host, "error", err)
			return nil, err
		}
		d := &net.Dialer{
			Timeout:   30 * time.Second,
			KeepAlive: 30 * time.Second,
			Control: func(_, address string, _ syscall.RawConn) error {
				ap, err := netip.ParseAddrPort(address)
				if err != nil {
					return fmt.Errorf("%w: cannot parse dialed address %q", ErrRefused, address)
				}
				if err := p.checkAddr(ap.Addr()); err != nil {
					log.Warn("token endpoint refused at connect time", "host", host, "address", ap.Addr().String(), "error", err)
					return err
				}
				return nil
			},
		}
		return d.DialContext(ctx, network, addr)
	}
}

// Client returns an HTTP client for calls to token endpoints that enforces
// p on every connection and keeps up to idlePerHost idle connections per
// host. It connects directly, without HTTP_PROXY: a proxy would resolve the
// name where the address cannot be checked. It follows no redirect: a 307
// or 308 answer to a token request would send the refresh token, and in
// post style the client secret, to wherever it points (see RefuseRedirect).
// Refusals are logged to log.
func (p Policy) Client(idlePerHost int, log *slog.Logger) *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.DialContext = p.dialContext(log)
	t.MaxIdleConnsPerHost = idlePerHost
	t.MaxIdleConns = 4 * idlePerHost
	return &http.Client{Transport: t, CheckRedirect: RefuseRedirect}
}

// RefuseRedirect is an http.Client CheckRedirect that hands a redirect
// answer back as it is. A token request must never follow one: a 307 or
// 308 would send the refresh token, and in post style the client secret,
// to wherever the answer points.
func RefuseRedirect(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
