package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
)

// revokeLeaseTTL is the refresh lease revoke holds on a credential while it
// revokes its tokens and forgets it: longer than the two revocation calls
// (httpTimeout each) and the KV round trips, so no refresh can rotate the
// tokens between the read and the revocation.
const revokeLeaseTTL = 3 * httpTimeout

// revokeHolder names revoke as a lease holder, for status.
const revokeHolder = "publisher revoke"

func revokeCmd(ctx context.Context, args []string, s streams) error {
	f := newFlags("revoke", "revoke [flags] (--issuer URL | --revocation-endpoint URL) KEY…", `
End the credentials KEY… at the authorization server, then forget them as
delete does. For each KEY, revoke holds the credential's refresh lease (so
no refresher rotates the tokens meanwhile), revokes the refresh token, which
ends its grant, and then the access token at the revocation endpoint (RFC
7009), authenticated as the stored client, and then deletes the credential.

The revocation endpoint is the issuer's revocation_endpoint from its
metadata (--issuer, which must be the issuer whose token endpoint the
credential uses), or --revocation-endpoint. When the issuer's metadata names
none, revoke says so and only deletes: the tokens then stay valid until
they expire. A credential whose revocation fails is not deleted, so revoke
can be run again.

revoke is an operator command: it needs a NATS user with JetStream access to
the authbus streams and buckets, and the refreshers' seal key file
(--seal-key-file), since the refresh token and client secret are sealed in
the store. No refresher needs to run. To forget a credential without
calling the authorization server, use delete.
Exits 3 if a KEY was not registered (the others are still revoked).`, s)
	issuer := f.String("issuer", "", "authorization server issuer; its metadata names the revocation endpoint")
	f.bind("issuer", "AUTHBUS_ISSUER")
	endpoint := f.String("revocation-endpoint", "", "revocation endpoint `URL` (RFC 7009), instead of --issuer")
	f.bind("revocation-endpoint", "AUTHBUS_REVOCATION_ENDPOINT")
	sealKeyFile := f.String("seal-key-file", "authbus-data/seal-keys.json", "the refreshers' seal key `file`, to open the stored refresh token and client secret (the default is the embedded refresher's, from the folder it runs in)")
	f.bind("seal-key-file", "AUTHBUS_SEAL_KEY_FILE")
	asJSON := f.Bool("json", false, "print one JSON object per key: what was revoked, found and removed")
	if err := f.parse(args); err != nil {
		return err
	}
	keys, err := f.keys()
	if err != nil {
		return err
	}
	switch {
	case *issuer == "" && *endpoint == "":
		return usageErrorf("give --issuer (its metadata names the revocation endpoint) or --revocation-endpoint; to forget credentials without revoking them, use delete")
	case *issuer != "" && *endpoint != "":
		return usageErrorf("give --issuer or --revocation-endpoint, not both")
	case *endpoint != "":
		if err := checkEndpoint("--revocation-endpoint", *endpoint); err != nil {
			return err
		}
	}
	ring, err := openSealKey(*sealKeyFile)
	if err != nil {
		return err
	}
	c, err := f.connect()
	if err != nil {
		return err
	}
	defer c.close()
	js, err := jetstream.New(c.nc)
	if err != nil {
		return err
	}
	r := &revoker{g: c.g, js: js, hc: &http.Client{Timeout: httpTimeout}, endpoint: *endpoint}
	octx, cancel := context.WithTimeout(ctx, c.g.timeout)
	r.store, err = kv.OpenStore(octx, js, c.g.subj.CredentialsBucket(), ring)
	if err == nil {
		r.leases, err = kv.OpenLeases(octx, js, c.g.subj.LeasesBucket(), revokeLeaseTTL)
	}
	cancel()
	if err != nil {
		return err
	}
	if *issuer != "" {
		md, err := discover(ctx, r.hc, *issuer)
		if err != nil {
			return err
		}
		r.issuer, r.tokenEndpoint, r.endpoint = md.Issuer, md.TokenEndpoint, md.RevocationEndpoint
		if r.endpoint == "" {
			fmt.Fprintf(s.errOut, "note: the metadata of %s names no revocation endpoint: nothing is revoked there, and the tokens stay valid until they expire; deleting only\n", md.Issuer)
		} else if err := checkEndpoint("revocation_endpoint", r.endpoint); err != nil {
			return err
		}
	}

	var missing []events.Key
	var errs []error
	for _, k := range keys {
		res, err := r.revoke(ctx, k)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", k, err))
			continue
		}
		if !res.Registered {
			missing = append(missing, k)
		}
		if *asJSON {
			if err := writeJSON(s, res); err != nil {
				return err
			}
			continue
		}
		if res.RefreshTokenRevoked || res.AccessTokenRevoked {
			fmt.Fprintf(s.out, "revoked %s at %s: %s\n", k, res.RevocationEndpoint, revokedWhat(res))
		}
		printForgotten(s, k, res.Forgotten)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w; those credentials were not deleted: run revoke again once the cause is fixed, or delete them without revoking", err)
	}
	return notRegistered(missing)
}

// revokeResult is the --json output of revoke, one per key.
type revokeResult struct {
	Key                 string `json:"key"`
	RevocationEndpoint  string `json:"revocation_endpoint,omitempty"`
	RefreshTokenRevoked bool   `json:"refresh_token_revoked"`
	AccessTokenRevoked  bool   `json:"access_token_revoked"`
	workers.Forgotten
}

func revokedWhat(r revokeResult) string {
	switch {
	case r.RefreshTokenRevoked && r.AccessTokenRevoked:
		return "the refresh token (its grant) and the access token"
	case r.RefreshTokenRevoked:
		return "the refresh token (its grant); the server does not revoke access tokens, which stay valid until they expire"
	}
	return "the access token (the credential has no refresh token)"
}

// openSealKey loads the refreshers' key ring, which must exist: revoke
// must not create a new, useless one.
func openSealKey(path string) (*kv.KeyRing, error) {
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil, usageErrorf("--seal-key-file: no key file at %s; give the refreshers' seal key file (the embedded refresher keeps it in authbus-data/ of the folder it runs in)", path)
	}
	ring, _, err := kv.LoadOrCreateKeyRing(path)
	if err != nil {
		return nil, fmt.Errorf("--seal-key-file: %w", err)
	}
	return ring, nil
}

// revoker revokes credentials of one deployment at one revocation
// endpoint.
type revoker struct {
	g      *globals
	js     jetstream.JetStream
	hc     *http.Client
	store  *kv.Store
	leases *kv.Leases
	// endpoint is the revocation endpoint; "" when the issuer has none.
	endpoint string
	// issuer and tokenEndpoint are set with --issuer: a credential must use
	// that token endpoint, or revoking at this issuer would revoke nothing.
	issuer, tokenEndpoint string
}

func (r *revoker) revoke(ctx context.Context, k events.Key) (revokeResult, error) {
	res := revokeResult{Key: k.String(), RevocationEndpoint: r.endpoint}
	lease, err := r.claim(ctx, k)
	if err != nil {
		return res, err
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.g.timeout)
		defer cancel()
		_ = lease.Release(rctx)
	}()

	gctx, cancel := context.WithTimeout(ctx, r.g.timeout)
	// From the stream leader, under the lease: the refresh token in force,
	// not one a lagging replica still shows.
	cred, _, err := r.store.Latest(gctx, lease.Key())
	cancel()
	switch {
	case errors.Is(err, kv.ErrNotFound):
	case err != nil:
		return res, err
	case r.tokenEndpoint != "" && cred.TokenEndpoint != r.tokenEndpoint:
		return res, usageErrorf("its token endpoint is %s, but %s's is %s: give the issuer it was registered at, or --revocation-endpoint", cred.TokenEndpoint, r.issuer, r.tokenEndpoint)
	case r.endpoint != "":
		// The refresh token first: revoking it ends the grant, so the
		// access token cannot be refreshed into a new one meanwhile.
		if !cred.RefreshToken.IsZero() {
			if err := r.revokeToken(ctx, cred, cred.RefreshToken, "refresh_token"); err != nil {
				return res, err
			}
			res.RefreshTokenRevoked = true
		}
		switch err := r.revokeToken(ctx, cred, cred.AccessToken, "access_token"); {
		case res.RefreshTokenRevoked && isUnsupportedTokenType(err):
			// RFC 7009 §2.2.1: a server may revoke refresh tokens only.
		case err != nil:
			return res, err
		default:
			res.AccessTokenRevoked = true
		}
	}

	fctx, cancel := context.WithTimeout(ctx, r.g.timeout)
	defer cancel()
	done, err := workers.Forget(fctx, r.js, r.g.subj, k)
	if err != nil {
		return res, err
	}
	res.Forgotten = done
	return res, nil
}

// claim takes the credential's refresh lease, waiting up to --timeout for
// a refresh in flight to finish.
func (r *revoker) claim(ctx context.Context, k events.Key) (*kv.Lease, error) {
	ctx, cancel := context.WithTimeout(ctx, r.g.timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	held := func() error {
		return fmt.Errorf("a refresh held the credential for all of --timeout %v (%w); run revoke again", r.g.timeout, kv.ErrLeaseHeld)
	}
	wasHeld := false
	for {
		lease, err := r.leases.Claim(ctx, k, revokeHolder, kv.Read{})
		switch {
		case err == nil:
			return lease, nil
		case ctx.Err() != nil && wasHeld:
			return nil, held()
		case !errors.Is(err, kv.ErrLeaseHeld):
			return nil, err
		}
		wasHeld = true
		select {
		case <-tick.C:
		case <-ctx.Done():
			return nil, held()
		}
	}
}

// revocationError is a revocation endpoint's error answer (RFC 7009 §2.2.1).
type revocationError struct {
	status            int
	code, description string
}

func (e *revocationError) Error() string {
	msg := fmt.Sprintf("the revocation endpoint answered HTTP %d", e.status)
	if e.code != "" {
		msg += " " + e.code
	}
	if e.description != "" {
		msg += " (" + e.description + ")"
	}
	switch {
	case e.status == http.StatusServiceUnavailable || e.status == http.StatusTooManyRequests:
		msg += "; the server is busy: run revoke again later"
	case e.code == "invalid_client" || e.code == "unauthorized_client":
		msg += "; the stored client is not allowed to revoke this token there: check --issuer"
	}
	return msg
}

func isUnsupportedTokenType(err error) bool {
	var re *revocationError
	return errors.As(err, &re) && re.code == "unsupported_token_type"
}

// revokeToken revokes one token, authenticated as the credential's client
// the way it authenticates at the token endpoint (RFC 7009 §2.1).
func (r *revoker) revokeToken(ctx context.Context, cred *kv.Credential, token kv.Secret, hint string) error {
	form := url.Values{"token": {token.Reveal()}, "token_type_hint": {hint}}
	basic := cred.AuthStyle != events.AuthStylePost && !cred.ClientSecret.IsZero()
	if !basic {
		form.Set("client_id", cred.ClientID)
		if !cred.ClientSecret.IsZero() {
			form.Set("client_secret", cred.ClientSecret.Reveal())
		}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if basic {
		// RFC 6749 §2.3.1: id and secret are form-url-encoded first.
		req.SetBasicAuth(url.QueryEscape(cred.ClientID), url.QueryEscape(cred.ClientSecret.Reveal()))
	}
	resp, err := r.hc.Do(req)
	if err != nil {
		// The token is in the body, never in the URL that *url.Error names.
		return fmt.Errorf("revoke the %s: %w", strings.ReplaceAll(hint, "_", " "), err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	e := &revocationError{status: resp.StatusCode}
	var answer struct {
		Error            string `json:"error"`
		ErrorDescription string `json:"error_description"`
	}
	if json.Unmarshal(body, &answer) == nil {
		e.code, e.description = answer.Error, answer.ErrorDescription
	}
	return fmt.Errorf("revoke the %s: %w", strings.ReplaceAll(hint, "_", " "), e)
}
