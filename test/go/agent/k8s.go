package main

// KubernetesApi/MakeRequest served on the reverse tunnel (--k8s-api URL), the way agentk serves it:
// the request stream (grpctool.HttpRequest: header, data*, trailer, upgradeData*) becomes an HTTP
// request to the API server at URL, and its answer goes back as grpctool.HttpResponse: header,
// one data message per body read as it arrives (so watches flow), trailer, and for a successful
// upgrade (101) the raw connection bytes as upgradeData both ways.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"net/url"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"kasdpb/gitlab/agent/grpctool"
	k8srpc "kasdpb/gitlab/agent/kubernetes_api/rpc"
	"kasdpb/gitlab/agent/prototool"
	"kasdtest/peer"
)

const (
	k8sServiceName    = "gitlab.agent.kubernetes_api.rpc.KubernetesApi"
	methodMakeRequest = "/" + k8sServiceName + "/MakeRequest"
	headerExtraType   = "gitlab.agent.kubernetes_api.rpc.HeaderExtra"
)

// Hop-by-hop headers (RFC 9110 7.6.1), never forwarded; kas strips them too.
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// k8sTransport does every request; no compression of its own, so bodies pass through as they are.
// Upgrades use HTTP/1.1 only (an empty TLSNextProto turns HTTP/2 off): Upgrade needs HTTP/1.1.
var (
	k8sTransport        = &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 64}
	k8sUpgradeTransport = &http.Transport{DisableCompression: true, DisableKeepAlives: true,
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}
)

type k8sCall struct {
	a       *agent
	c       *call
	sentHdr bool
}

func (k *k8sCall) send(m *grpctool.HttpResponse) error {
	if !k.sentHdr {
		k.sentHdr = true
		if err := k.c.header(map[string]*prototool.Values{}); err != nil {
			return err
		}
	}
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	return k.c.message(b)
}

func (a *agent) makeRequest(ctx context.Context, c *call) (codes.Code, string) {
	k := &k8sCall{a: a, c: c}
	fail := func(code codes.Code, msg string) (codes.Code, string) {
		_ = c.fail(code, msg)
		return code, msg
	}
	first, ok := <-c.in
	if !ok {
		if c.broken != nil {
			return codes.Canceled, c.broken.Error()
		}
		return fail(codes.InvalidArgument, "gRPC -> HTTP: request stream ended before its header")
	}
	var m grpctool.HttpRequest
	if err := proto.Unmarshal(first, &m); err != nil {
		return fail(codes.InvalidArgument, "gRPC -> HTTP: bad HttpRequest: "+err.Error())
	}
	h := m.GetHeader()
	if h == nil || h.Request == nil {
		return fail(codes.InvalidArgument, "gRPC -> HTTP: first HttpRequest message is not a header with a request")
	}
	req, upgrade, err := a.newK8sRequest(ctx, h)
	if err != nil {
		return fail(codes.Unavailable, "gRPC -> HTTP: "+err.Error())
	}

	// Request body: data messages into a pipe; the pipe ends at close_send (at the trailer for an
	// upgrade). Upgrade data waits for the 101 answer's connection.
	pr, pw := io.Pipe()
	// content_length (proto3 optional): unset or -1 = unknown, 0 = no body, > 0 = the size.
	_, lengthSet := h.GetXContentLength().(*grpctool.HttpRequest_Header_ContentLength)
	noBody := lengthSet && h.GetContentLength() == 0
	if noBody || upgrade {
		req.Body = http.NoBody
		req.ContentLength = 0
	} else {
		req.Body = pr
		req.ContentLength = -1
		if h.GetContentLength() > 0 {
			req.ContentLength = h.GetContentLength()
		}
	}
	upConn := make(chan io.ReadWriteCloser, 1)
	inErr := make(chan error, 1)
	go func() { inErr <- k.pumpRequest(pw, noBody || upgrade, upConn) }()

	rt := k8sTransport
	if upgrade {
		rt = k8sUpgradeTransport
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		pr.CloseWithError(err)
		if ctx.Err() != nil {
			return codes.Canceled, "gRPC -> HTTP: " + ctx.Err().Error()
		}
		return fail(codes.Unavailable, "gRPC -> HTTP: "+err.Error())
	}
	defer resp.Body.Close()
	hdr := http.Header{}
	for key, v := range resp.Header {
		hdr[key] = append([]string(nil), v...)
	}
	hdr.Add("Via", fmt.Sprintf("%d.%d %s", resp.ProtoMajor, resp.ProtoMinor, a.userAgent))
	ev := map[string]interface{}{"method": req.Method, "url": req.URL.String(), "status": resp.StatusCode}
	if u := req.Header.Get("Impersonate-User"); u != "" {
		ev["impersonate_user"] = u
	}
	peer.Event("k8s_request", ev)
	err = k.send(&grpctool.HttpResponse{Message: &grpctool.HttpResponse_Header_{Header: &grpctool.HttpResponse_Header{
		Response: &prototool.HttpResponse{StatusCode: int32(resp.StatusCode), Status: resp.Status, Header: toValues(hdr)}}}})
	if err != nil {
		return codes.Unavailable, err.Error()
	}
	buf := make([]byte, 32*1024)
	switched := upgrade && resp.StatusCode == http.StatusSwitchingProtocols
	if !switched {
		for {
			n, rerr := resp.Body.Read(buf)
			if n > 0 {
				if err := k.send(&grpctool.HttpResponse{Message: &grpctool.HttpResponse_Data_{
					Data: &grpctool.HttpResponse_Data{Data: buf[:n]}}}); err != nil {
					return codes.Unavailable, err.Error()
				}
			}
			if rerr == io.EOF {
				break
			}
			if rerr != nil {
				if ctx.Err() != nil {
					return codes.Canceled, "gRPC -> HTTP: " + ctx.Err().Error()
				}
				return fail(codes.Unavailable, "gRPC -> HTTP: read HTTP response body: "+rerr.Error())
			}
		}
	}
	if err := k.send(&grpctool.HttpResponse{Message: &grpctool.HttpResponse_Trailer_{Trailer: &grpctool.HttpResponse_Trailer{}}}); err != nil {
		return codes.Unavailable, err.Error()
	}
	if switched {
		rwc, ok := resp.Body.(io.ReadWriteCloser)
		if !ok {
			return fail(codes.Internal, "gRPC -> HTTP: 101 answer without a connection")
		}
		upConn <- rwc
		stop := make(chan struct{})
		var once sync.Once
		go func() {
			select {
			case <-ctx.Done():
			case <-stop:
			}
			once.Do(func() { rwc.Close() })
		}()
		defer close(stop)
		for {
			n, rerr := rwc.Read(buf)
			if n > 0 {
				if err := k.send(&grpctool.HttpResponse{Message: &grpctool.HttpResponse_UpgradeData_{
					UpgradeData: &grpctool.HttpResponse_UpgradeData{Data: buf[:n]}}}); err != nil {
					return codes.Unavailable, err.Error()
				}
			}
			if rerr != nil {
				break
			}
		}
	} else {
		close(upConn)
		// The request stream must have ended properly (close_send) for the call to be complete.
		if err := <-inErr; err != nil {
			return fail(codes.Internal, "gRPC -> HTTP: "+err.Error())
		}
	}
	if c.broken != nil {
		return codes.Canceled, c.broken.Error()
	}
	if err := c.trailer(map[string]*prototool.Values{}); err != nil {
		return codes.Unavailable, err.Error()
	}
	return codes.OK, ""
}

// pumpRequest reads the HttpRequest messages after the header: data into pw (an error if the
// request has no body), trailer, then upgrade data into the upgraded connection once there is one.
func (k *k8sCall) pumpRequest(pw *io.PipeWriter, noBody bool, upConn chan io.ReadWriteCloser) error {
	var conn io.ReadWriteCloser
	trailer := false
	fail := func(err error) error {
		pw.CloseWithError(err)
		for range k.c.in {
		}
		return err
	}
	for b := range k.c.in {
		var m grpctool.HttpRequest
		if err := proto.Unmarshal(b, &m); err != nil {
			return fail(fmt.Errorf("bad HttpRequest: %v", err))
		}
		switch {
		case m.GetData() != nil:
			if trailer || noBody {
				return fail(errors.New("unexpected HttpRequest data message"))
			}
			if _, err := pw.Write(m.GetData().Data); err != nil {
				return fail(err)
			}
		case m.GetTrailer() != nil:
			if trailer {
				return fail(errors.New("second HttpRequest trailer"))
			}
			trailer = true
			pw.Close()
		case m.GetUpgradeData() != nil:
			if !trailer {
				return fail(errors.New("HttpRequest upgradeData before the trailer"))
			}
			if conn == nil {
				c, ok := <-upConn
				if !ok {
					return fail(errors.New("HttpRequest upgradeData without a switched connection"))
				}
				conn = c
			}
			if _, err := conn.Write(m.GetUpgradeData().Data); err != nil {
				return fail(err)
			}
		default:
			return fail(errors.New("unexpected HttpRequest message (a second header?)"))
		}
	}
	if k.c.broken != nil {
		pw.CloseWithError(k.c.broken)
		return nil
	}
	pw.Close()
	if conn != nil {
		// The client's side of the upgraded connection ended (kas half-closes the call when the
		// client's connection reads EOF): end the upstream connection too, which ends its reader
		// and so the call. A 101 body offers no CloseWrite, so this is a full close.
		conn.Close()
	}
	if !trailer {
		return errors.New("request stream ended without a trailer")
	}
	return nil
}

// newK8sRequest builds the HTTP request as agentk does: the API server URL with url_path as its
// path and query re-encoded; the headers without hop-by-hop ones (Upgrade kept for an upgrade);
// Via added; impersonation from the header's extra applied.
func (a *agent) newK8sRequest(ctx context.Context, h *grpctool.HttpRequest_Header) (*http.Request, bool, error) {
	r := h.Request
	u := *a.k8sAPI
	u.Path = r.UrlPath
	u.RawPath = ""
	q := url.Values{}
	for key, v := range r.Query {
		q[key] = append([]string(nil), v.GetValue()...)
	}
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, r.Method, u.String(), nil)
	if err != nil {
		return nil, false, err
	}
	hdr := http.Header{}
	for key, v := range r.Header {
		for _, s := range v.GetValue() {
			hdr.Add(key, s)
		}
	}
	upgrade := hdr.Get("Upgrade")
	for _, f := range hdr.Values("Connection") {
		for _, name := range strings.Split(f, ",") {
			if name = textproto.TrimString(name); name != "" {
				hdr.Del(name)
			}
		}
	}
	for _, name := range hopHeaders {
		hdr.Del(name)
	}
	hdr.Del("Host")
	if upgrade != "" {
		hdr.Set("Upgrade", upgrade)
		hdr.Set("Connection", "Upgrade")
	}
	hdr.Add("Via", "gRPC/1.0 "+a.userAgent)
	req.Header = hdr

	imp, err := impersonation(h)
	if err != nil {
		return nil, false, err
	}
	if imp != nil {
		for key := range hdr {
			if key == "Impersonate-User" || key == "Impersonate-Uid" || key == "Impersonate-Group" ||
				strings.HasPrefix(key, "Impersonate-Extra-") {
				return nil, false, errors.New("nested impersonation is not supported - agent is already configured to impersonate an identity")
			}
		}
		hdr.Set("Impersonate-User", imp.Username)
		if imp.Uid != "" {
			hdr.Set("Impersonate-Uid", imp.Uid)
		}
		for _, g := range imp.Groups {
			hdr.Add("Impersonate-Group", g)
		}
		for _, kv := range imp.Extra {
			for _, v := range kv.Val {
				hdr.Add("Impersonate-Extra-"+headerKeyEscape(kv.Key), v)
			}
		}
	}
	return req, upgrade != "", nil
}

// impersonation returns the header's non-empty ImpersonationConfig, or nil.
func impersonation(h *grpctool.HttpRequest_Header) (*k8srpc.ImpersonationConfig, error) {
	if h.Extra == nil {
		return nil, nil
	}
	name := h.Extra.TypeUrl[strings.LastIndex(h.Extra.TypeUrl, "/")+1:]
	if name != headerExtraType {
		return nil, fmt.Errorf("header extra of unexpected type %q", h.Extra.TypeUrl)
	}
	var extra k8srpc.HeaderExtra
	if err := proto.Unmarshal(h.Extra.Value, &extra); err != nil {
		return nil, fmt.Errorf("header extra: %v", err)
	}
	imp := extra.ImpConfig
	if imp == nil || imp.Username == "" && len(imp.Groups) == 0 && imp.Uid == "" && len(imp.Extra) == 0 {
		return nil, nil
	}
	return imp, nil
}

// headerKeyEscape %-encodes the bytes of an extra key that may not appear in a header name, and
// '%' itself (client-go's encoding of Impersonate-Extra-<key>).
func headerKeyEscape(key string) string {
	var b strings.Builder
	for i := 0; i < len(key); i++ {
		c := key[i]
		token := c > ' ' && c < 0x7f && !strings.ContainsRune("\"(),/:;<=>?@[\\]{}%", rune(c))
		if token {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func toValues(h http.Header) map[string]*prototool.Values {
	out := make(map[string]*prototool.Values, len(h))
	for key, v := range h {
		out[key] = vals(v...)
	}
	return out
}
