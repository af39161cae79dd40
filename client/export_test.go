package client

// SetEventHook makes s call f for every token (from an auth.rotated event,
// "rotated", or a token reply, "reply") and every auth.needs_reauth event
// ("needs_reauth") it considers, with its version and whether it was
// applied. f runs under the Source's lock: it must not call s.
func SetEventHook(s *Source, f func(from string, version int64, applied bool)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onEvent = f
}

// CleanURL is what an auth.401 event carries as the URL, for tests.
var CleanURL = cleanURL
