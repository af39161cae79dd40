package events

// ErrorReply is the JSON body of an error reply from the token and register
// services. The same code and description also travel in the NATS micro
// headers Nats-Service-Error-Code (see StatusOf) and Nats-Service-Error, so
// clients that only look at headers still learn what went wrong.
type ErrorReply struct {
	// Error is one of the Code constants.
	Error string `json:"error"`
	// ErrorDescription says what went wrong and what to do, naming the bad
	// field when there is one.
	ErrorDescription string `json:"error_description"`
	// Reason is the needs_reauth reason (such as "invalid_grant"); set only
	// when Error is CodeNeedsReauth.
	Reason string `json:"reason,omitempty"`
}

// The error codes of ErrorReply.Error.
const (
	// CodeInvalidRequest: the request is malformed; the description names the field.
	CodeInvalidRequest = "invalid_request"
	// CodeForbidden: the caller may not act on this key.
	CodeForbidden = "forbidden"
	// CodeNotFound: no credential is registered under this key.
	CodeNotFound = "not_found"
	// CodeNeedsReauth: the credential needs a person to log in again.
	CodeNeedsReauth = "needs_reauth"
	// CodeUnavailable: authbus cannot answer now; try again later.
	CodeUnavailable = "unavailable"
)

var codeStatus = [...]struct{ code, status string }{
	{CodeInvalidRequest, "400"},
	{CodeForbidden, "403"},
	{CodeNotFound, "404"},
	{CodeNeedsReauth, "409"},
	{CodeUnavailable, "503"},
}

// StatusOf returns the NATS micro Nats-Service-Error-Code of an error code:
// "400", "403", "404", "409" or "503". An unknown code is treated as
// CodeUnavailable ("503"), the answer that makes a client retry rather than
// give up.
func StatusOf(code string) string {
	for _, cs := range codeStatus {
		if cs.code == code {
			return cs.status
		}
	}
	return "503"
}

// CodeOf is the inverse of StatusOf; an unknown status (a micro framework
// error such as "500") is CodeUnavailable.
func CodeOf(status string) string {
	for _, cs := range codeStatus {
		if cs.status == status {
			return cs.code
		}
	}
	return CodeUnavailable
}
