// Package docs holds authbus's documents for people, protocol.md first. It
// has no code of its own: its test decodes every example of protocol.md
// with the events package, so the document cannot drift from the wire
// format, and regenerates the examples from a live installation when run
// with -update:
//
//	go test ./docs -run TestGenerateProtocolExamples -update
package docs
