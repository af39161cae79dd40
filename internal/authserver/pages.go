package authserver

import (
	"html/template"
	"net/http"
)

// page is one HTML page a person sees: the consent and verification pages
// and what follows them. Their forms are plain HTML, so a test can play the
// browser with an HTTP client.
type page struct {
	Title string
	Text  []string
	Form  *form
}

type form struct {
	Method, Action string
	Hidden         map[string]string
	Input          string // name of a text field to fill in, "" for none
	Buttons        []button
}

// button is a submit button; the one pressed sends Name=Value.
type button struct{ Name, Value, Label string }

// decisionButtons are the two answers of a consent form.
var decisionButtons = []button{{"decision", "approve", "Approve"}, {"decision", "deny", "Deny"}}

var pageTemplate = template.Must(template.New("page").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{.Title}}</title>
<style>body{font-family:sans-serif;max-width:40em;margin:3em auto}button{margin-right:1em}</style></head>
<body><h1>{{.Title}}</h1>
{{range .Text}}<p>{{.}}</p>
{{end}}{{with .Form}}<form method="{{.Method}}" action="{{.Action}}">
{{range $k, $v := .Hidden}}<input type="hidden" name="{{$k}}" value="{{$v}}">
{{end}}{{if .Input}}<input type="text" name="{{.Input}}" autofocus>
{{end}}{{range .Buttons}}<button type="submit" name="{{.Name}}" value="{{.Value}}">{{.Label}}</button>
{{end}}</form>
{{end}}<p><small>authbus development authorization server: no accounts, whoever approves here is the user.</small></p>
</body></html>
`))

// writePage answers with p as HTML. Pages are never cached: they carry
// one-time request ids.
func writePage(w http.ResponseWriter, status int, p page) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	// The consent form must not be framed by another site (clickjacking).
	w.Header().Set("X-Frame-Options", "DENY")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' http://127.0.0.1:* http://localhost:* http://[::1]:*; frame-ancestors 'none'")
	w.WriteHeader(status)
	_ = pageTemplate.Execute(w, p)
}

// handleHome says what the server is and where its endpoints are, for a
// person who opens the issuer URL.
func (s *Server) handleHome(w http.ResponseWriter, r *http.Request) {
	writePage(w, http.StatusOK, page{
		Title: "authbus development authorization server",
		Text: []string{
			"Issuer " + s.base + ". Metadata: " + s.base + MetadataPath + ".",
			"Log in with publisher login --issuer " + s.base + " --client-id CLIENT KEY; on a headless machine add --device and enter the code at " + s.base + DevicePath + ".",
		},
	})
}
