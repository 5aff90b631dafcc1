// kasd-kaslike: the bench's stand-in for GitLab kas on one instance (bench/run S1, S4, S7).
//
// A small grpc-go server written from ../shared/design/wire.md (no GitLab code) that does what
// kas does for a routed call, the way kas is built (grpc-go, one goroutine per stream, generated
// protobuf-go messages):
//
//   - agent port: agents call AgentRegistrar/Register (unary) and keep ReverseTunnel/Connect
//     streams open; each tunnel sends its descriptor first and waits. Every call carries
//     `authorization: Bearer <agent token>`, resolved through the bench's token file (kas asks
//     GitLab and caches the answer; a map lookup here).
//   - api port: any method (grpc-go's unknown-service handler) with a JWT (HS256, audience
//     gitlab-kas, checked in full on every call as kas's auth middleware does) and
//     `kas-hop-routing-agent-id` is matched to an idle tunnel of that agent whose descriptor lists
//     the method (waiting up to the call's deadline, capped at 20 s, if none is idle) and relayed
//     message by message: RequestInfo, Message*, CloseSend to the agent; Header, Message*,
//     Trailer or Error back to the caller. A tunnel carries one call, then its stream ends.
//
// What it leaves out (all of it favours this peer in a comparison): Redis (tunnel registry,
// connected-agent info), the GitLab API round trip for agent tokens (a preloaded map), metrics,
// logging and tracing interceptors, the kas-to-kas private API, GetConfiguration.
//
// Output (stdout, JSON lines): {"event":"listening","agent":ADDR,"api":ADDR,"pid":N} once both
// listeners are up, {"event":"stats",...} on SIGTERM/SIGINT, after a graceful stop.
//
//	kasd-kaslike --token-file FILE --api-secret-file FILE [--agent-listen 127.0.0.1:0] [--api-listen 127.0.0.1:0]
//	             [--cert-file PEM --key-file PEM]   (TLS on the agent listener)
package main

import (
	"bufio"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/gzip" // agentk gzips every message
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	registrarrpc "kasdpb/gitlab/agent/agent_registrar/rpc"
	"kasdpb/gitlab/agent/prototool"
	tunnelrpc "kasdpb/gitlab/agent/reverse_tunnel/rpc"
)

const (
	routingKey    = "kas-hop-routing-agent-id"
	maxRouteWait  = 20 * time.Second // GitLab kas's cap on waiting for a tunnel
	jwtLeeway     = 5 * time.Second
	jwtAudience   = "gitlab-kas"
	maxMessageLen = 10 << 20 // agentk's message limit
)

// ---- codec: generated (protobuf-go) messages, and raw bytes for routed payloads ----

type raw []byte

// codec replaces grpc-go's "proto" codec: Debian's grpc-go 1.33 marshals with the APIv1
// runtime, the generated code is APIv2 (same reason as test/go/peer/codec.go).
type codec struct{}

func (codec) Name() string { return "proto" }

func (codec) Marshal(v interface{}) ([]byte, error) {
	switch m := v.(type) {
	case *raw:
		return []byte(*m), nil
	case proto.Message:
		return proto.Marshal(m)
	}
	return nil, fmt.Errorf("codec: cannot marshal %T", v)
}

func (codec) Unmarshal(data []byte, v interface{}) error {
	switch m := v.(type) {
	case *raw:
		*m = append((*m)[:0], data...)
		return nil
	case proto.Message:
		return proto.Unmarshal(data, m)
	}
	return fmt.Errorf("codec: cannot unmarshal into %T", v)
}

// ---- tunnels ----

type tunnel struct {
	agentID int64
	stream  grpc.ServerStream
	methods map[string]bool // full method names the descriptor lists: "/pkg.Service/Method"

	once sync.Once
	done chan error // the relay's outcome: ends the Connect stream

	sendMu sync.Mutex // caller -> agent sends after the stream ended must not happen
	closed bool
}

func (t *tunnel) finish(err error) {
	t.once.Do(func() { t.done <- err })
}

// send sends one ConnectResponse unless the Connect handler has returned.
func (t *tunnel) send(m *tunnelrpc.ConnectResponse) error {
	t.sendMu.Lock()
	defer t.sendMu.Unlock()
	if t.closed {
		return io.EOF
	}
	return t.stream.SendMsg(m)
}

type waiter struct {
	method string
	ch     chan *tunnel // buffered 1
}

type agentState struct {
	idle    []*tunnel
	waiters []*waiter
	meta    *registrarrpc.RegisterRequest // the last Register (kas keeps it in Redis)
}

type registry struct {
	mu     sync.Mutex
	agents map[int64]*agentState
}

func (r *registry) agent(id int64) *agentState {
	a := r.agents[id]
	if a == nil {
		a = &agentState{}
		r.agents[id] = a
	}
	return a
}

// add makes t available: to a call waiting for it, or to the idle pool.
func (r *registry) add(t *tunnel) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.agent(t.agentID)
	for i, w := range a.waiters {
		if t.methods[w.method] {
			a.waiters = append(a.waiters[:i], a.waiters[i+1:]...)
			w.ch <- t
			return
		}
	}
	a.idle = append(a.idle, t)
}

// remove takes t out of the idle pool; false if a call has it.
func (r *registry) remove(t *tunnel) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.agents[t.agentID]
	if a == nil {
		return false
	}
	for i, x := range a.idle {
		if x == t {
			a.idle[i] = a.idle[len(a.idle)-1]
			a.idle = a.idle[:len(a.idle)-1]
			return true
		}
	}
	return false
}

// take returns an idle tunnel of the agent serving method, waiting until ctx ends.
func (r *registry) take(ctx context.Context, agentID int64, method string) *tunnel {
	r.mu.Lock()
	a := r.agent(agentID)
	for i := len(a.idle) - 1; i >= 0; i-- {
		if t := a.idle[i]; t.methods[method] {
			a.idle = append(a.idle[:i], a.idle[i+1:]...)
			r.mu.Unlock()
			return t
		}
	}
	w := &waiter{method: method, ch: make(chan *tunnel, 1)}
	a.waiters = append(a.waiters, w)
	r.mu.Unlock()
	select {
	case t := <-w.ch:
		return t
	case <-ctx.Done():
	}
	r.mu.Lock()
	for i, x := range a.waiters {
		if x == w {
			a.waiters = append(a.waiters[:i], a.waiters[i+1:]...)
			r.mu.Unlock()
			return nil
		}
	}
	r.mu.Unlock()
	t := <-w.ch // handed over just as the deadline passed: give it back
	r.add(t)
	return nil
}

// ---- the server ----

type server struct {
	tokens map[string]int64 // agent token -> agent id
	secret []byte           // api JWT secret
	reg    registry

	routedOK, routedFailed, tunnelsOpened, registers, authFailures int64
}

type agentIDKey struct{}

// agentAuth resolves `authorization: Bearer <token>` on the agent port (kas: GitLab's agent_info
// API behind a cache).
func (s *server) agentAuth(ctx context.Context) (context.Context, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get("authorization")
	if len(v) == 1 && strings.HasPrefix(v[0], "Bearer ") {
		if id, ok := s.tokens[v[0][len("Bearer "):]]; ok {
			return context.WithValue(ctx, agentIDKey{}, id), nil
		}
	}
	atomic.AddInt64(&s.authFailures, 1)
	return nil, status.Error(codes.Unauthenticated, "unauthenticated")
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (c ctxStream) Context() context.Context { return c.ctx }

func (s *server) agentStreamAuth(srv interface{}, ss grpc.ServerStream, _ *grpc.StreamServerInfo,
	h grpc.StreamHandler) error {
	ctx, err := s.agentAuth(ss.Context())
	if err != nil {
		return err
	}
	return h(srv, ctxStream{ss, ctx})
}

func (s *server) agentUnaryAuth(ctx context.Context, req interface{}, _ *grpc.UnaryServerInfo,
	h grpc.UnaryHandler) (interface{}, error) {
	ctx, err := s.agentAuth(ctx)
	if err != nil {
		return nil, err
	}
	return h(ctx, req)
}

func (s *server) register(_ interface{}, ctx context.Context, dec func(interface{}) error,
	ic grpc.UnaryServerInterceptor) (interface{}, error) {
	req := &registrarrpc.RegisterRequest{}
	if err := dec(req); err != nil {
		return nil, err
	}
	h := func(ctx context.Context, r interface{}) (interface{}, error) {
		id := ctx.Value(agentIDKey{}).(int64)
		s.reg.mu.Lock()
		s.reg.agent(id).meta = r.(*registrarrpc.RegisterRequest)
		s.reg.mu.Unlock()
		atomic.AddInt64(&s.registers, 1)
		return &registrarrpc.RegisterResponse{}, nil
	}
	return ic(ctx, req, &grpc.UnaryServerInfo{FullMethod: "/gitlab.agent.agent_registrar.rpc.AgentRegistrar/Register"}, h)
}

// connect serves one reverse tunnel: descriptor, then idle until a call takes it.
func (s *server) connect(_ interface{}, stream grpc.ServerStream) error {
	ctx := stream.Context()
	agentID := ctx.Value(agentIDKey{}).(int64)
	first := &tunnelrpc.ConnectRequest{}
	if err := stream.RecvMsg(first); err != nil {
		return err
	}
	d := first.GetDescriptor_()
	if d == nil {
		return status.Error(codes.InvalidArgument, "the first message of a tunnel must be its descriptor")
	}
	t := &tunnel{agentID: agentID, stream: stream, methods: map[string]bool{}, done: make(chan error, 1)}
	for _, svc := range d.GetAgentDescriptor().GetServices() {
		for _, m := range svc.GetMethods() {
			t.methods["/"+svc.GetName()+"/"+m.GetName()] = true
		}
	}
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	atomic.AddInt64(&s.tunnelsOpened, 1)
	s.reg.add(t)
	var err error
	select {
	case err = <-t.done:
	case <-ctx.Done():
		if s.reg.remove(t) {
			err = ctx.Err()
		} else {
			err = <-t.done // a call has it: the relay ends on the cancelled stream
		}
	}
	t.sendMu.Lock()
	t.closed = true
	t.sendMu.Unlock()
	return err
}

// ---- api port ----

var errJWT = status.Error(codes.Unauthenticated, "unauthenticated")

// checkJWT verifies an HS256 JWT in full: signature, audience, exp and nbf with leeway.
func (s *server) checkJWT(tok string) error {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return errJWT
	}
	var hdr struct {
		Alg string `json:"alg"`
	}
	hb, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil || json.Unmarshal(hb, &hdr) != nil || hdr.Alg != "HS256" {
		return errJWT
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return errJWT
	}
	mac := hmac.New(sha256.New, s.secret)
	mac.Write([]byte(tok[:len(parts[0])+1+len(parts[1])]))
	if !hmac.Equal(mac.Sum(nil), sig) {
		return errJWT
	}
	var cl struct {
		Aud interface{} `json:"aud"`
		Exp *float64    `json:"exp"`
		Nbf *float64    `json:"nbf"`
	}
	cb, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil || json.Unmarshal(cb, &cl) != nil {
		return errJWT
	}
	audOK := false
	switch a := cl.Aud.(type) {
	case string:
		audOK = a == jwtAudience
	case []interface{}:
		for _, x := range a {
			audOK = audOK || x == jwtAudience
		}
	}
	now := float64(time.Now().Unix())
	lw := jwtLeeway.Seconds()
	if !audOK || cl.Exp == nil || now > *cl.Exp+lw || (cl.Nbf != nil && now+lw < *cl.Nbf) {
		return errJWT
	}
	return nil
}

// route serves any method on the api port: authenticate, find a tunnel, relay.
func (s *server) route(_ interface{}, stream grpc.ServerStream) (err error) {
	defer func() {
		if err != nil {
			atomic.AddInt64(&s.routedFailed, 1)
		} else {
			atomic.AddInt64(&s.routedOK, 1)
		}
	}()
	ctx := stream.Context()
	method, _ := grpc.MethodFromServerStream(stream)
	md, _ := metadata.FromIncomingContext(ctx)
	auth := md.Get("authorization")
	if len(auth) != 1 || !strings.HasPrefix(auth[0], "Bearer ") {
		return errJWT
	}
	if err := s.checkJWT(auth[0][len("Bearer "):]); err != nil {
		return err
	}
	ids := md.Get(routingKey)
	if len(ids) != 1 {
		return status.Error(codes.InvalidArgument, "want exactly one "+routingKey)
	}
	agentID, perr := strconv.ParseInt(ids[0], 10, 64)
	if perr != nil {
		return status.Error(codes.InvalidArgument, "bad "+routingKey)
	}
	wctx, cancel := ctx, context.CancelFunc(func() {})
	if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > maxRouteWait {
		wctx, cancel = context.WithTimeout(ctx, maxRouteWait)
	}
	t := s.reg.take(wctx, agentID, method)
	cancel()
	if t == nil {
		if ctx.Err() != nil {
			return status.FromContextError(ctx.Err()).Err()
		}
		return status.Error(codes.DeadlineExceeded, "agent connection not found")
	}
	return s.relay(ctx, stream, t, method, md)
}

func toValues(md metadata.MD, skip func(string) bool) map[string]*prototool.Values {
	out := make(map[string]*prototool.Values, len(md))
	for k, v := range md {
		if !skip(k) {
			out[k] = &prototool.Values{Value: v}
		}
	}
	return out
}

func fromValues(m map[string]*prototool.Values) metadata.MD {
	md := make(metadata.MD, len(m))
	for k, v := range m {
		md[k] = v.GetValue()
	}
	return md
}

func callerKeyDropped(k string) bool {
	return strings.HasPrefix(k, "kas-hop-") || k == "authorization" || strings.HasPrefix(k, ":") ||
		k == "content-type" || k == "user-agent"
}

func (s *server) relay(ctx context.Context, caller grpc.ServerStream, t *tunnel, method string,
	md metadata.MD) error {
	// The Connect stream ends once both halves are done, or at once if the caller goes away.
	var halves int32 = 2
	half := func() {
		if atomic.AddInt32(&halves, -1) == 0 {
			t.finish(nil)
		}
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-ctx.Done():
			t.finish(status.Error(codes.Canceled, "caller went away"))
		case <-stop:
		}
	}()
	info := &tunnelrpc.ConnectResponse{Msg: &tunnelrpc.ConnectResponse_RequestInfo{
		RequestInfo: &tunnelrpc.RequestInfo{MethodName: method, Meta: toValues(md, callerKeyDropped)}}}
	if err := t.send(info); err != nil {
		t.finish(err)
		return status.Error(codes.Unavailable, "tunnel failed")
	}
	// caller -> agent
	go func() {
		defer half()
		var m raw
		for {
			if err := caller.RecvMsg(&m); err != nil {
				if err == io.EOF {
					_ = t.send(&tunnelrpc.ConnectResponse{Msg: &tunnelrpc.ConnectResponse_CloseSend{
						CloseSend: &tunnelrpc.CloseSend{}}})
				} else {
					t.finish(err)
				}
				return
			}
			data := append([]byte(nil), m...)
			if t.send(&tunnelrpc.ConnectResponse{Msg: &tunnelrpc.ConnectResponse_Message{
				Message: &tunnelrpc.Message{Data: data}}}) != nil {
				return
			}
		}
	}()
	// agent -> caller
	defer half()
	for {
		in := &tunnelrpc.ConnectRequest{}
		if err := t.stream.RecvMsg(in); err != nil {
			t.finish(err)
			return status.Error(codes.Unavailable, "tunnel closed before the call's status")
		}
		switch m := in.Msg.(type) {
		case *tunnelrpc.ConnectRequest_Header:
			if err := caller.SendHeader(fromValues(m.Header.GetMeta())); err != nil {
				t.finish(err)
				return err
			}
		case *tunnelrpc.ConnectRequest_Message:
			b := raw(m.Message.GetData())
			if err := caller.SendMsg(&b); err != nil {
				t.finish(err)
				return err
			}
		case *tunnelrpc.ConnectRequest_Trailer:
			caller.SetTrailer(fromValues(m.Trailer.GetMeta()))
			return nil
		case *tunnelrpc.ConnectRequest_Error:
			st := m.Error.GetStatus()
			return status.Error(codes.Code(st.GetCode()), st.GetMessage())
		default:
			err := status.Error(codes.Internal, "unexpected tunnel message")
			t.finish(err)
			return err
		}
	}
}

// ---- main ----

var tokenLine = regexp.MustCompile(`token:\s*"([^"]+)".*agent_id:\s*(\d+)`)

func readTokens(path string) (map[string]int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := tokenLine.FindStringSubmatch(sc.Text()); m != nil {
			id, _ := strconv.ParseInt(m[2], 10, 64)
			out[m[1]] = id
		}
	}
	return out, sc.Err()
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "kasd-kaslike: %v\n", err)
	os.Exit(1)
}

func main() {
	agentAddr := flag.String("agent-listen", "127.0.0.1:0", "agent listener")
	apiAddr := flag.String("api-listen", "127.0.0.1:0", "api listener (GitLab's side)")
	tokenFile := flag.String("token-file", "", "agent tokens (bench/agentsim --write-tokens format)")
	secretFile := flag.String("api-secret-file", "", "api JWT secret, base64")
	certFile := flag.String("cert-file", "", "agent listener TLS certificate (PEM); h2c without it")
	keyFile := flag.String("key-file", "", "agent listener TLS key (PEM)")
	flag.Parse()
	if *tokenFile == "" || *secretFile == "" {
		fatal(errors.New("--token-file and --api-secret-file are required"))
	}
	encoding.RegisterCodec(codec{})
	s := &server{reg: registry{agents: map[int64]*agentState{}}}
	var err error
	if s.tokens, err = readTokens(*tokenFile); err != nil {
		fatal(err)
	}
	sb, err := os.ReadFile(*secretFile)
	if err != nil {
		fatal(err)
	}
	if s.secret, err = base64.StdEncoding.DecodeString(strings.TrimSpace(string(sb))); err != nil {
		fatal(fmt.Errorf("%s: %v", *secretFile, err))
	}

	common := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(maxMessageLen),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 50 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 20 * time.Second,
			PermitWithoutStream: true}),
	}
	agentOpts := append(common, grpc.StreamInterceptor(s.agentStreamAuth), grpc.UnaryInterceptor(s.agentUnaryAuth))
	if *certFile != "" {
		creds, err := credentials.NewServerTLSFromFile(*certFile, *keyFile)
		if err != nil {
			fatal(err)
		}
		agentOpts = append(agentOpts, grpc.Creds(creds))
	}
	agentSrv := grpc.NewServer(agentOpts...)
	agentSrv.RegisterService(&grpc.ServiceDesc{
		ServiceName: "gitlab.agent.reverse_tunnel.rpc.ReverseTunnel",
		HandlerType: (*interface{})(nil),
		Streams: []grpc.StreamDesc{{StreamName: "Connect", Handler: s.connect, ServerStreams: true,
			ClientStreams: true}},
	}, s)
	agentSrv.RegisterService(&grpc.ServiceDesc{
		ServiceName: "gitlab.agent.agent_registrar.rpc.AgentRegistrar",
		HandlerType: (*interface{})(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Register", Handler: s.register}},
	}, s)
	apiSrv := grpc.NewServer(append(common, grpc.UnknownServiceHandler(s.route))...)

	al, err := net.Listen("tcp", *agentAddr)
	if err != nil {
		fatal(err)
	}
	pl, err := net.Listen("tcp", *apiAddr)
	if err != nil {
		fatal(err)
	}
	go agentSrv.Serve(al)
	go apiSrv.Serve(pl)
	ev, _ := json.Marshal(map[string]interface{}{"event": "listening", "agent": al.Addr().String(),
		"api": pl.Addr().String(), "pid": os.Getpid(), "agents_known": len(s.tokens)})
	fmt.Println(string(ev))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	stopped := make(chan struct{})
	go func() {
		apiSrv.GracefulStop()
		agentSrv.Stop() // idle tunnels never end by themselves
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(3 * time.Second):
		apiSrv.Stop()
		agentSrv.Stop()
	}
	ev, _ = json.Marshal(map[string]interface{}{"event": "stats",
		"routed_ok": atomic.LoadInt64(&s.routedOK), "routed_failed": atomic.LoadInt64(&s.routedFailed),
		"tunnels_opened": atomic.LoadInt64(&s.tunnelsOpened), "registers": atomic.LoadInt64(&s.registers),
		"auth_failures": atomic.LoadInt64(&s.authFailures)})
	fmt.Println(string(ev))
}
