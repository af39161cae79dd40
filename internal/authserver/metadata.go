package authserver

import (
	"encoding/json"
	"net/http"
)

// The paths of the server's endpoints, relative to BaseURL. The issuer has
// no path, so both forms of RFC 8414 §3.1 and OpenID Connect Discovery §4
// coincide with the two metadata paths.
const (
	// MetadataPath serves the RFC 8414 authorization server metadata.
	MetadataPath = "/.well-known/oauth-authorization-server"
	// OpenIDConfigurationPath serves the OpenID Connect discovery document.
	OpenIDConfigurationPath = "/.well-known/openid-configuration"
	// TokenPath is the token endpoint (RFC 6749 §3.2).
	TokenPath = "/token"
	// AuthorizePath is the authorization endpoint (RFC 6749 §3.1): GET
	// shows the consent page, whose form POSTs the decision back.
	AuthorizePath = "/authorize"
	// DeviceAuthorizationPath is the device authorization endpoint (RFC
	// 8628 §3.1).
	DeviceAuthorizationPath = "/device_authorization"
	// DevicePath is the verification page where a person enters a device's
	// user code and approves it (RFC 8628 §3.3).
	DevicePath = "/device"
	// RevocationPath is the revocation endpoint (RFC 7009).
	RevocationPath = "/revoke"
)

// DeviceCodeGrant is the grant_type of the device authorization grant (RFC
// 8628 §3.4).
const DeviceCodeGrant = "urn:ietf:params:oauth:grant-type:device_code"

// SetMetadata chooses which discovery documents the server serves: the RFC
// 8414 one at MetadataPath, the OpenID Connect one at
// OpenIDConfigurationPath. One not served answers 404, as from servers that
// publish only one of them (Dex, for one, serves only the OpenID Connect
// document). Both are served by default.
func (s *Server) SetMetadata(oauth, openid bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.noOAuthMeta, s.noOIDCMeta = !oauth, !openid
}

// SetRevocation turns the revocation endpoint on (the default) or off. Off,
// it answers 404 and the metadata names no revocation_endpoint, as with
// servers that have none (Dex).
func (s *Server) SetRevocation(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.noRevocation = !on
}

// MetadataCalls returns how many requests for either discovery document have
// arrived, served or answered 404. Token calls are not counted.
func (s *Server) MetadataCalls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.meta
}

func (s *Server) handleMetadata(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.meta++
	off := r.URL.Path == MetadataPath && s.noOAuthMeta || r.URL.Path == OpenIDConfigurationPath && s.noOIDCMeta
	revocation := !s.noRevocation
	s.mu.Unlock()
	if off {
		http.NotFound(w, r)
		return
	}
	md := map[string]any{
		"issuer":                                s.base,
		"authorization_endpoint":                s.base + AuthorizePath,
		"token_endpoint":                        s.TokenURL(),
		"device_authorization_endpoint":         s.base + DeviceAuthorizationPath,
		"token_endpoint_auth_methods_supported": []string{"client_secret_basic", "client_secret_post"},
		"grant_types_supported":                 []string{"authorization_code", "refresh_token", "client_credentials", DeviceCodeGrant},
		"response_types_supported":              []string{"code"},
		"code_challenge_methods_supported":      []string{"S256"},
	}
	if revocation {
		md["revocation_endpoint"] = s.base + RevocationPath
		md["revocation_endpoint_auth_methods_supported"] = []string{"client_secret_basic", "client_secret_post"}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(md)
}
