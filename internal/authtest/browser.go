package authtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/net/html"
)

// Browser plays the web browser of a person who logs in: it opens pages,
// fills in and submits their forms and follows redirects, as clicking
// would, so a test drives the authorization server's consent and
// verification pages over real HTTP, and the final redirect reaches the
// client's loopback listener.
type Browser struct {
	// Client makes the requests; it follows redirects unless its
	// CheckRedirect says otherwise. nil means http.DefaultClient.
	Client *http.Client
}

// Page is a page the browser has open.
type Page struct {
	URL    *url.URL // after redirects
	Status int
	Header http.Header
	Body   string
}

// Open loads rawURL.
func (b Browser) Open(ctx context.Context, rawURL string) (*Page, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, err
	}
	return b.do(req)
}

func (b Browser) do(req *http.Request) (*Page, error) {
	hc := b.Client
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", resp.Request.URL, err)
	}
	return &Page{URL: resp.Request.URL, Status: resp.StatusCode, Header: resp.Header, Body: string(body)}, nil
}

// Submit submits the page's first form as a person would: its hidden
// fields as they are, its text fields filled from fields, and the submit
// button whose value is button ("" presses the first). It returns the page
// the submission leads to.
func (b Browser) Submit(ctx context.Context, p *Page, fields map[string]string, button string) (*Page, error) {
	f, err := firstForm(p.Body)
	if err != nil {
		return nil, fmt.Errorf("page %s (HTTP %d): %w", p.URL, p.Status, err)
	}
	vals := url.Values{}
	for _, in := range f.inputs {
		switch in.typ {
		case "hidden":
			vals.Set(in.name, in.value)
		case "", "text":
			vals.Set(in.name, fields[in.name])
		}
	}
	pressed := false
	for _, btn := range f.buttons {
		if button == "" || btn.value == button {
			if btn.name != "" {
				vals.Set(btn.name, btn.value)
			}
			pressed = true
			break
		}
	}
	if !pressed {
		return nil, fmt.Errorf("page %s has no %q button", p.URL, button)
	}
	action, err := p.URL.Parse(f.action)
	if err != nil {
		return nil, fmt.Errorf("page %s: form action %q: %w", p.URL, f.action, err)
	}
	var req *http.Request
	if strings.EqualFold(f.method, "post") {
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, action.String(), strings.NewReader(vals.Encode()))
		if err == nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
	} else {
		action.RawQuery = vals.Encode()
		req, err = http.NewRequestWithContext(ctx, http.MethodGet, action.String(), nil)
	}
	if err != nil {
		return nil, err
	}
	return b.do(req)
}

// Approve logs in at authorizeURL: it opens the consent page and presses
// Approve, and returns the page the redirect back to the client shows.
func (b Browser) Approve(ctx context.Context, authorizeURL string) (*Page, error) {
	return b.decide(ctx, authorizeURL, "approve")
}

// ApproveDevice approves a device's login: it opens the verification page
// verificationURI, types userCode, continues, and presses Approve.
func (b Browser) ApproveDevice(ctx context.Context, verificationURI, userCode string) (*Page, error) {
	p, err := b.Open(ctx, verificationURI)
	if err != nil {
		return nil, err
	}
	if p.Status != http.StatusOK {
		return p, fmt.Errorf("verification page %s: HTTP %d", p.URL, p.Status)
	}
	p, err = b.Submit(ctx, p, map[string]string{"user_code": userCode}, "")
	if err != nil {
		return nil, err
	}
	if p.Status != http.StatusOK {
		return p, fmt.Errorf("user code %s: HTTP %d", userCode, p.Status)
	}
	return b.Submit(ctx, p, nil, "approve")
}

// Deny opens the consent page at authorizeURL and presses Deny.
func (b Browser) Deny(ctx context.Context, authorizeURL string) (*Page, error) {
	return b.decide(ctx, authorizeURL, "deny")
}

func (b Browser) decide(ctx context.Context, pageURL, decision string) (*Page, error) {
	p, err := b.Open(ctx, pageURL)
	if err != nil {
		return nil, err
	}
	if p.Status != http.StatusOK {
		return p, fmt.Errorf("consent page %s: HTTP %d", p.URL, p.Status)
	}
	return b.Submit(ctx, p, nil, decision)
}

type htmlForm struct {
	method, action string
	inputs         []htmlInput
	buttons        []htmlInput
}

type htmlInput struct{ typ, name, value string }

// firstForm parses the first form of an HTML page.
func firstForm(page string) (*htmlForm, error) {
	doc, err := html.Parse(strings.NewReader(page))
	if err != nil {
		return nil, err
	}
	var f *htmlForm
	var walk func(*html.Node)
	walk = func(n *html.Node) {
		if n.Type == html.ElementNode {
			attr := func(k string) string {
				for _, a := range n.Attr {
					if a.Key == k {
						return a.Val
					}
				}
				return ""
			}
			switch {
			case n.Data == "form" && f == nil:
				f = &htmlForm{method: attr("method"), action: attr("action")}
			case n.Data == "input" && f != nil:
				f.inputs = append(f.inputs, htmlInput{strings.ToLower(attr("type")), attr("name"), attr("value")})
			case n.Data == "button" && f != nil:
				f.buttons = append(f.buttons, htmlInput{"submit", attr("name"), attr("value")})
			}
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk(doc)
	if f == nil {
		return nil, errors.New("no form on the page")
	}
	return f, nil
}
