package mcpauth_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"

	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/authbus/authbus/client"
	"github.com/authbus/authbus/client/mcpauth"
	"github.com/authbus/authbus/internal/examplebus"
)

// An MCP client (the official Go SDK's) whose bearer token authbus keeps
// fresh: the Handler goes into the SDK's streamable HTTP transport.
func Example() {
	bus := examplebus.Start() // NATS and a refresher
	defer bus.Stop()
	bus.Register("acme.alice.mcp", "at-example-alice", "rt-example-alice")
	mcpURL, stopServer := startMCPServer("at-example-alice")
	defer stopServer()

	src, err := client.New(bus.NC, "acme.alice.mcp", client.WithRuntime("example-host"))
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()
	transport := &mcp.StreamableClientTransport{Endpoint: mcpURL, OAuthHandler: mcpauth.New(src)}
	session, err := mcp.NewClient(&mcp.Implementation{Name: "example-client", Version: "v1.0.0"}, nil).
		Connect(context.Background(), transport, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer session.Close()

	res, err := session.CallTool(context.Background(), &mcp.CallToolParams{Name: "greet", Arguments: map[string]any{"name": "alice"}})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(res.Content[0].(*mcp.TextContent).Text)
	// Output: hello, alice
}

// startMCPServer serves an MCP server with the tool "greet" that accepts
// only the bearer token want, and returns its URL and how to stop it.
func startMCPServer(want string) (string, func()) {
	server := mcp.NewServer(&mcp.Implementation{Name: "example-server", Version: "v1.0.0"}, nil)
	type in struct {
		Name string `json:"name"`
	}
	mcp.AddTool(server, &mcp.Tool{Name: "greet", Description: "says hello"}, func(_ context.Context, _ *mcp.CallToolRequest, args in) (*mcp.CallToolResult, any, error) {
		return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: "hello, " + args.Name}}}, nil, nil
	})
	handler := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return server },
		&mcp.StreamableHTTPOptions{Logger: slog.New(slog.DiscardHandler)})
	verify := func(_ context.Context, tok string, _ *http.Request) (*auth.TokenInfo, error) {
		if tok != want {
			return nil, auth.ErrInvalidToken
		}
		return &auth.TokenInfo{}, nil
	}
	srv := httptest.NewServer(auth.RequireBearerToken(verify, &auth.RequireBearerTokenOptions{AllowMissingExpiration: true})(handler))
	return srv.URL, func() {
		for ss := range server.Sessions() {
			_ = ss.Close()
		}
		srv.CloseClientConnections()
		srv.Close()
	}
}
