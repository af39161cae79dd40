package telemetry

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"go.opentelemetry.io/otel/trace"
)

// NewLogger returns a slog.Logger writing format ("text" or "json") at level
// ("debug", "info", "warn", "error") to w. Records logged with a context
// that holds a span carry its trace_id and span_id (see TraceHandler).
func NewLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch strings.ToLower(format) {
	case "text", "":
		return slog.New(TraceHandler(slog.NewTextHandler(w, opts))), nil
	case "json":
		return slog.New(TraceHandler(slog.NewJSONHandler(w, opts))), nil
	default:
		return nil, fmt.Errorf("log format %q: use text or json", format)
	}
}

// TraceHandler wraps h so that every record logged with a context holding a
// valid span context (a local span, or the remote parent an event carried
// in when tracing is off) gets trace_id and span_id attributes: that is how
// a log line is found from a trace and the other way round. Like any record
// attribute they land inside groups opened with WithGroup. It is safe for
// concurrent use if h is.
func TraceHandler(h slog.Handler) slog.Handler {
	if th, ok := h.(traceHandler); ok {
		return th
	}
	return traceHandler{h}
}

type traceHandler struct{ slog.Handler }

func (h traceHandler) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		r.AddAttrs(slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String()))
	}
	return h.Handler.Handle(ctx, r)
}

func (h traceHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return traceHandler{h.Handler.WithAttrs(attrs)}
}

func (h traceHandler) WithGroup(name string) slog.Handler {
	return traceHandler{h.Handler.WithGroup(name)}
}
