package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"

	"kasdpb/gitlab/agent/prototool"
	tunnelinfo "kasdpb/gitlab/agent/reverse_tunnel/info"
	tunnelrpc "kasdpb/gitlab/agent/reverse_tunnel/rpc"
	googlerpc "kasdpb/google/rpc"
	"kasdtest/peer"
)

// The methods this agent serves through its tunnels (listed in every tunnel's descriptor).
const (
	serviceName  = "kasd.test.Echo"
	methodUnary  = "/kasd.test.Echo/Unary"
	methodStream = "/kasd.test.Echo/Stream"
	methodFail   = "/kasd.test.Echo/Fail"
)

// pool keeps reverse tunnels open like agentk: when fewer than minIdle are idle (a tunnel being
// opened counts as idle), it opens up to batch more, never more than max streams in all.
type pool struct {
	a                   *agent
	minIdle, max, batch int

	mu       sync.Mutex
	idle     int
	total    int
	failures int
	wake     chan struct{}
}

func newPool(a *agent, minIdle, max, batch int) *pool {
	return &pool{a: a, minIdle: minIdle, max: max, batch: batch, wake: make(chan struct{}, 1)}
}

func (p *pool) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func (p *pool) counts() map[string]interface{} {
	return map[string]interface{}{"idle": p.idle, "total": p.total}
}

func (p *pool) run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		p.mu.Lock()
		need := 0
		if p.idle < p.minIdle && p.total < p.max {
			need = p.batch
			if need > p.max-p.total {
				need = p.max - p.total
			}
		}
		failures := p.failures
		p.mu.Unlock()
		if need > 0 && failures > 0 && !sleep(ctx, backoff(failures)) {
			return
		}
		if need > 0 {
			p.mu.Lock()
			p.idle += need
			p.total += need
			p.mu.Unlock()
			for i := 0; i < need; i++ {
				wg.Add(1)
				go func() { defer wg.Done(); p.tunnel(ctx) }()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-p.wake:
		}
	}
}

// descriptor lists kasd.test.Echo, and KubernetesApi/MakeRequest when --k8s-api is given.
func (a *agent) descriptor() *tunnelrpc.ConnectRequest {
	var methods []*tunnelinfo.Method
	for _, m := range []string{methodUnary, methodStream, methodFail} {
		methods = append(methods, &tunnelinfo.Method{Name: m[strings.LastIndex(m, "/")+1:]})
	}
	services := []*tunnelinfo.Service{{Name: serviceName, Methods: methods}}
	if a.k8sAPI != nil {
		services = append(services, &tunnelinfo.Service{Name: k8sServiceName,
			Methods: []*tunnelinfo.Method{{Name: methodMakeRequest[strings.LastIndex(methodMakeRequest, "/")+1:]}}})
	}
	return &tunnelrpc.ConnectRequest{Msg: &tunnelrpc.ConnectRequest_Descriptor_{Descriptor_: &tunnelrpc.Descriptor{
		AgentDescriptor: &tunnelinfo.AgentDescriptor{Services: services},
	}}}
}

// tunnel runs one ReverseTunnel/Connect stream: descriptor, wait for a call, serve it, end.
func (p *pool) tunnel(ctx context.Context) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	used := false
	opened := time.Now()
	failed := false
	defer func() {
		p.mu.Lock()
		p.total--
		if !used {
			p.idle--
		}
		if failed {
			p.failures++
		}
		p.mu.Unlock()
		p.poke()
	}()
	stream, err := tunnelrpc.NewReverseTunnelClient(p.a.conn).Connect(sctx)
	if err == nil {
		err = stream.Send(p.a.descriptor())
	}
	if err != nil {
		if ctx.Err() == nil {
			failed = true
			errorEvent("tunnel_open", err)
		}
		return
	}
	p.mu.Lock()
	c := p.counts()
	p.mu.Unlock()
	peer.Event("tunnel_open", c)
	first, err := stream.Recv()
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		// A stream that ends soon without a call is a failure (backoff); one kasd ends after a
		// while (max connection age, shutdown) is not.
		failed = time.Since(opened) < 5*time.Second
		ev := map[string]interface{}{"used": false, "after": time.Since(opened).String()}
		addStatus(ev, err)
		peer.Event("tunnel_closed", ev)
		return
	}
	ri := first.GetRequestInfo()
	if ri == nil {
		peer.Event("error", map[string]interface{}{"what": "tunnel", "message": fmt.Sprintf("first message from kasd is not request_info: %v", first)})
		return
	}
	used = true
	p.mu.Lock()
	p.idle--
	p.failures = 0
	c = p.counts()
	p.mu.Unlock()
	p.poke()
	c["method"] = ri.MethodName
	peer.Event("tunnel_used", c)
	p.a.serve(sctx, cancel, stream, ri)
}

func addStatus(ev map[string]interface{}, err error) {
	if err == io.EOF {
		ev["code"] = codes.OK.String()
		return
	}
	st := statusOf(err)
	ev["code"] = st.Code().String()
	ev["message"] = st.Message()
}

// call is one call served on a tunnel: the request messages arrive on in, which is closed at
// close_send (or when the stream breaks: then broken is set first).
type call struct {
	stream   tunnelrpc.ReverseTunnel_ConnectClient
	method   string
	meta     map[string]*prototool.Values
	in       chan []byte
	broken   error
	inBytes  int64
	outBytes int64
}

func (c *call) get(key string) string {
	if v := c.meta[key]; v != nil && len(v.Value) > 0 {
		return v.Value[0]
	}
	return ""
}

func (c *call) send(r *tunnelrpc.ConnectRequest) error { return c.stream.Send(r) }

func (c *call) header(meta map[string]*prototool.Values) error {
	return c.send(&tunnelrpc.ConnectRequest{Msg: &tunnelrpc.ConnectRequest_Header{Header: &tunnelrpc.Header{Meta: meta}}})
}

func (c *call) message(data []byte) error {
	c.outBytes += int64(len(data))
	return c.send(&tunnelrpc.ConnectRequest{Msg: &tunnelrpc.ConnectRequest_Message{Message: &tunnelrpc.Message{Data: data}}})
}

func (c *call) trailer(meta map[string]*prototool.Values) error {
	return c.send(&tunnelrpc.ConnectRequest{Msg: &tunnelrpc.ConnectRequest_Trailer{Trailer: &tunnelrpc.Trailer{Meta: meta}}})
}

func (c *call) fail(code codes.Code, msg string) error {
	return c.send(&tunnelrpc.ConnectRequest{Msg: &tunnelrpc.ConnectRequest_Error{Error: &tunnelrpc.Error{
		Status: &googlerpc.Status{Code: int32(code), Message: msg}}}})
}

func vals(v ...string) *prototool.Values { return &prototool.Values{Value: v} }

// echoHeader is the call's response header: x-agent-pod-id, and every request metadata key k as
// echo-<k> (except HTTP/2 and gRPC transport keys), so the caller sees what reached the agent.
func (a *agent) echoHeader(c *call) map[string]*prototool.Values {
	h := map[string]*prototool.Values{"x-agent-pod-id": vals(strconv.FormatInt(a.podID, 10))}
	for k, v := range c.meta {
		if strings.HasPrefix(k, ":") || strings.HasPrefix(k, "grpc-") || k == "content-type" || k == "te" {
			continue
		}
		h["echo-"+k] = vals(v.Value...)
	}
	return h
}

func (a *agent) serve(ctx context.Context, cancel context.CancelFunc, stream tunnelrpc.ReverseTunnel_ConnectClient, ri *tunnelrpc.RequestInfo) {
	start := time.Now()
	c := &call{stream: stream, method: ri.MethodName, meta: ri.Meta, in: make(chan []byte, 16)}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		closed := false
		for {
			m, err := stream.Recv()
			if err != nil {
				if !closed {
					if err == io.EOF {
						err = fmt.Errorf("stream ended before close_send")
					}
					c.broken = err
					close(c.in)
					cancel()
				}
				return
			}
			switch {
			case m.GetMessage() != nil && !closed:
				c.inBytes += int64(len(m.GetMessage().Data))
				select {
				case c.in <- m.GetMessage().Data:
				case <-ctx.Done():
				}
			case m.GetCloseSend() != nil && !closed:
				closed = true
				close(c.in)
			default:
				peer.Event("error", map[string]interface{}{"what": "tunnel", "method": c.method,
					"message": fmt.Sprintf("unexpected message from kasd during the call: %v", m)})
			}
		}
	}()

	var code codes.Code
	var msg string
	switch c.method {
	case methodUnary:
		code, msg = a.unary(c)
	case methodStream:
		code, msg = a.streamCall(ctx, c)
	case methodFail:
		code, msg = codes.Code(a.failCode), "failed by go agent"
		_ = c.fail(code, msg)
	case methodMakeRequest:
		if a.k8sAPI == nil {
			code, msg = codes.Unimplemented, "kasd-goagent serves "+c.method+" only with --k8s-api"
			_ = c.fail(code, msg)
			break
		}
		code, msg = a.makeRequest(ctx, c)
	default:
		code, msg = codes.Unimplemented, "kasd-goagent does not serve "+c.method
		_ = c.fail(code, msg)
	}
	_ = stream.CloseSend()
	select {
	case <-readerDone:
	case <-time.After(10 * time.Second):
		cancel()
		<-readerDone
	}
	ev := map[string]interface{}{"method": c.method, "code": code.String(), "in_bytes": c.inBytes,
		"out_bytes": c.outBytes, "duration": time.Since(start).String()}
	if msg != "" {
		ev["message"] = msg
	}
	if c.broken != nil && code == codes.OK {
		ev["broken"] = c.broken.Error()
	}
	peer.Event("call_served", ev)
}

// unary: after close_send, header (echo-*), one message "echo:" + the request messages, trailer.
func (a *agent) unary(c *call) (codes.Code, string) {
	var body []byte
	n := 0
	for m := range c.in {
		body = append(body, m...)
		n++
	}
	if c.broken != nil {
		return codes.Canceled, c.broken.Error()
	}
	if err := c.header(a.echoHeader(c)); err != nil {
		return codes.Unavailable, err.Error()
	}
	if err := c.message(append([]byte("echo:"), body...)); err != nil {
		return codes.Unavailable, err.Error()
	}
	if err := c.trailer(map[string]*prototool.Values{"x-echo-count": vals(strconv.Itoa(n))}); err != nil {
		return codes.Unavailable, err.Error()
	}
	return codes.OK, ""
}

// streamCall: header at once, then by x-stream-mode:
//
//	echo (default): every message echoed as it arrives; trailer x-echo-count, x-echo-bytes.
//	gen: sends x-gen-bytes bytes of peer.Content(x-gen-seed) in peer.ChunkSize messages while
//	     checking the request messages against peer.Content(x-expect-seed), x-expect-bytes in
//	     all; trailer x-recv-bytes, x-sent-bytes, or Error DATA_LOSS naming the first difference.
func (a *agent) streamCall(ctx context.Context, c *call) (codes.Code, string) {
	if err := c.header(a.echoHeader(c)); err != nil {
		return codes.Unavailable, err.Error()
	}
	if c.get("x-stream-mode") != "gen" {
		n, total := 0, 0
		for m := range c.in {
			n++
			total += len(m)
			if err := c.message(m); err != nil {
				return codes.Unavailable, err.Error()
			}
		}
		if c.broken != nil {
			return codes.Canceled, c.broken.Error()
		}
		if err := c.trailer(map[string]*prototool.Values{"x-echo-count": vals(strconv.Itoa(n)),
			"x-echo-bytes": vals(strconv.Itoa(total))}); err != nil {
			return codes.Unavailable, err.Error()
		}
		return codes.OK, ""
	}
	genBytes, _ := strconv.ParseInt(c.get("x-gen-bytes"), 10, 64)
	genSeed, _ := strconv.ParseUint(c.get("x-gen-seed"), 10, 64)
	expectBytes, _ := strconv.ParseInt(c.get("x-expect-bytes"), 10, 64)
	expectSeed, _ := strconv.ParseUint(c.get("x-expect-seed"), 10, 64)

	sendErr := make(chan error, 1)
	go func() {
		gen := peer.NewContent(genSeed)
		for i := 0; gen.Offset() < genBytes; i++ {
			n := int64(peer.ChunkSize(genSeed, i))
			if left := genBytes - gen.Offset(); n > left {
				n = left
			}
			buf := make([]byte, n)
			gen.Next(buf)
			if err := c.message(buf); err != nil {
				sendErr <- err
				return
			}
			if ctx.Err() != nil {
				sendErr <- ctx.Err()
				return
			}
		}
		sendErr <- nil
	}()
	check := peer.NewContent(expectSeed)
	var mismatch error
	for m := range c.in {
		if mismatch == nil {
			mismatch = check.Check(m)
		} else {
			check.Next(make([]byte, len(m)))
		}
	}
	if err := <-sendErr; err != nil {
		return codes.Unavailable, "sending: " + err.Error()
	}
	if c.broken != nil {
		return codes.Canceled, c.broken.Error()
	}
	if mismatch == nil && check.Offset() != expectBytes {
		mismatch = fmt.Errorf("received %d bytes, want %d", check.Offset(), expectBytes)
	}
	if mismatch != nil {
		msg := "agent received wrong content: " + mismatch.Error()
		_ = c.fail(codes.DataLoss, msg)
		return codes.DataLoss, msg
	}
	if err := c.trailer(map[string]*prototool.Values{"x-recv-bytes": vals(strconv.FormatInt(check.Offset(), 10)),
		"x-sent-bytes": vals(strconv.FormatInt(genBytes, 10))}); err != nil {
		return codes.Unavailable, err.Error()
	}
	return codes.OK, ""
}
