package authtest

// The paths of the discovery documents, relative to BaseURL (the issuer has
// no path, so both forms of RFC 8414 §3.1 and OpenID Connect Discovery §4
// coincide with these).
const (
	// MetadataPath serves the RFC 8414 authorization server metadata.
	MetadataPath = "/.well-known/oauth-authorization-server"
	// OpenIDConfigurationPath serves the OpenID Connect discovery document.
	OpenIDConfigurationPath = "/.well-known/openid-configuration"
)

// SetMetadata chooses which discovery documents the server serves: the RFC
// 8414 one at MetadataPath, the OpenID Connect one at
// OpenIDConfigurationPath. One not served answers 404, as from servers that
// publish only one of them (Dex, for one, serves only the OpenID Connect
// document). Both are served by default. It is safe for concurrent
// use.
func (s *Server) SetMetadata(oauth, openid bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.noOAuthMeta, s.noOIDCMeta = !oauth, !openid
}

// MetadataCalls returns how many requests for either discovery document have
// arrived, served or answered 404. Token calls are not counted. It is safe
// for concurrent use.
func (s *Server) MetadataCalls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.meta
}
