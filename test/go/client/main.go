// kasd-goclient: GitLab's side of kasd, on grpc-go: calls on the api listener with a JWT (HS256
// over the shared secret, audience gitlab-kas), routed to an agent by kas-hop-routing-agent-id.
//
//	kasd-goclient [flags] unary     routed /kasd.test.Echo/Unary: checks the echo and the header
//	kasd-goclient [flags] stream    routed /kasd.test.Echo/Stream, --bytes each way, byte-checked
//	                                (--mode gen: independent content each way; echo: echoed back)
//	kasd-goclient [flags] error     routed /kasd.test.Echo/Fail: prints the status; checks it
//	                                against --expect-code/--expect-message when given
//	kasd-goclient [flags] agents    AgentTracker/GetConnectedAgents by --agent-id or --project-id
//
// Every subcommand prints one JSON line on stdout; the exit code is 0 only when the answer is the
// expected one (otherwise 1, with the reason on stderr and in the JSON "error").
package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	_ "kasdpb/all"
	trackerrpc "kasdpb/gitlab/agent/agent_tracker/rpc"
	"kasdtest/peer"
)

const routingKey = "kas-hop-routing-agent-id"

var (
	addr       = flag.String("addr", "127.0.0.1:8153", "kasd api listener host:port")
	secretFile = flag.String("secret-file", "", "file holding the api secret, base64-encoded")
	caFile     = flag.String("ca-file", "", "use TLS, trusting this CA file")
	serverName = flag.String("server-name", "", "TLS server name (default: the address's host)")
	useGzip    = flag.Bool("gzip", false, "gzip-compress the call's messages")
	agentID    = flag.Int64("agent-id", 0, "agent to route to (unary, stream, error) or to list (agents)")
	projectID  = flag.Int64("project-id", 0, "agents: list the agents of this project")
	timeout    = flag.Duration("timeout", 30*time.Second, "call deadline (grpc-timeout)")
	data       = flag.String("data", "hello from kasd-goclient", "unary: the request message")
	tag        = flag.String("tag", "t-goclient", "unary: sent as x-test-tag; the agent must echo it in its header")
	nbytes     = flag.Int64("bytes", 8<<20, "stream: bytes in each direction")
	mode       = flag.String("mode", "gen", "stream: gen or echo")
	expectCode = flag.String("expect-code", "", "error: the status code expected (name like FAILED_PRECONDITION or number)")
	expectMsg  = flag.String("expect-message", "", "error: the status message expected")
)

func main() {
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: kasd-goclient [flags] unary|stream|error|agents")
		os.Exit(2)
	}
	raw, err := os.ReadFile(*secretFile)
	if err != nil {
		fail(nil, "secret file: %v", err)
	}
	secret, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(raw)))
	if err != nil {
		fail(nil, "secret file: not base64: %v", err)
	}
	opts := []grpc.DialOption{grpc.WithInsecure()}
	if *caFile != "" {
		t, err := peer.ResolveTarget("grpcs://"+*addr, *caFile, *serverName, "")
		if err != nil {
			fail(nil, "%v", err)
		}
		opts = t.Opts
	}
	callOpts := []grpc.CallOption{grpc.MaxCallRecvMsgSize(64 << 20), grpc.MaxCallSendMsgSize(64 << 20)}
	if *useGzip {
		callOpts = append(callOpts, grpc.UseCompressor(gzip.Name))
	}
	opts = append(opts, grpc.WithDefaultCallOptions(callOpts...), grpc.WithUserAgent("kasd-goclient"))
	conn, err := grpc.Dial(*addr, opts...)
	if err != nil {
		fail(nil, "dial: %v", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+jwt(secret))

	switch flag.Arg(0) {
	case "unary":
		doUnary(ctx, conn)
	case "stream":
		doStream(ctx, conn)
	case "error":
		doError(ctx, conn)
	case "agents":
		doAgents(ctx, conn)
	default:
		fmt.Fprintf(os.Stderr, "kasd-goclient: unknown subcommand %q\n", flag.Arg(0))
		os.Exit(2)
	}
}

func b64url(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// jwt is GitLab's token for kas: HS256, aud gitlab-kas, iss gitlab, valid for a minute.
func jwt(secret []byte) string {
	now := time.Now().Unix()
	head, _ := json.Marshal(map[string]string{"alg": "HS256", "typ": "JWT"})
	claims, _ := json.Marshal(map[string]interface{}{"aud": "gitlab-kas", "iss": "gitlab", "iat": now, "nbf": now, "exp": now + 60})
	in := b64url(head) + "." + b64url(claims)
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(in))
	return in + "." + b64url(mac.Sum(nil))
}

func emit(m map[string]interface{}) {
	b, _ := json.Marshal(m)
	fmt.Println(string(b))
}

func fail(m map[string]interface{}, format string, args ...interface{}) {
	msg := fmt.Sprintf(format, args...)
	if m == nil {
		m = map[string]interface{}{}
	}
	m["ok"] = false
	m["error"] = msg
	emit(m)
	fmt.Fprintln(os.Stderr, "kasd-goclient: "+msg)
	os.Exit(1)
}

func routed(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, routingKey, strconv.FormatInt(*agentID, 10))
}

func statusFields(m map[string]interface{}, err error) {
	st := status.Convert(err)
	m["code"] = st.Code().String()
	m["code_number"] = int(st.Code())
	m["message"] = st.Message()
}

func first(md metadata.MD, k string) string {
	if v := md.Get(k); len(v) > 0 {
		return v[0]
	}
	return ""
}

func doUnary(ctx context.Context, conn *grpc.ClientConn) {
	ctx = metadata.AppendToOutgoingContext(routed(ctx), "x-test-tag", *tag)
	req := peer.Raw(*data)
	var resp peer.Raw
	var header, trailer metadata.MD
	err := conn.Invoke(ctx, "/kasd.test.Echo/Unary", &req, &resp, grpc.Header(&header), grpc.Trailer(&trailer))
	out := map[string]interface{}{"call": "unary", "gzip": *useGzip}
	statusFields(out, err)
	if err != nil {
		fail(out, "unary call failed: %s: %s", out["code"], out["message"])
	}
	out["response"] = string(resp)
	out["agent_pod_id"] = first(header, "x-agent-pod-id")
	out["echo_user_agent"] = first(header, "echo-user-agent")
	if want := "echo:" + *data; string(resp) != want {
		fail(out, "unary answer %q, want %q", resp, want)
	}
	if got := first(header, "echo-x-test-tag"); got != *tag {
		fail(out, "agent saw x-test-tag %q, want %q (header %v)", got, *tag, header)
	}
	for k := range header {
		if strings.HasPrefix(k, "echo-kas-hop-") || k == "echo-authorization" {
			fail(out, "kasd passed %s to the agent", strings.TrimPrefix(k, "echo-"))
		}
	}
	if got := first(trailer, "x-echo-count"); got != "1" {
		fail(out, "trailer x-echo-count %q, want 1", got)
	}
	out["ok"] = true
	emit(out)
}

func doStream(ctx context.Context, conn *grpc.ClientConn) {
	const upSeed, downSeed = 0x5eed0001, 0x5eed0002
	md := []string{"x-stream-mode", *mode}
	if *mode == "gen" {
		md = append(md, "x-gen-bytes", strconv.FormatInt(*nbytes, 10), "x-gen-seed", strconv.Itoa(downSeed),
			"x-expect-bytes", strconv.FormatInt(*nbytes, 10), "x-expect-seed", strconv.Itoa(upSeed))
	} else if *mode != "echo" {
		fail(nil, "--mode must be gen or echo")
	}
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(routed(ctx), md...))
	defer cancel()
	start := time.Now()
	s, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/kasd.test.Echo/Stream")
	out := map[string]interface{}{"call": "stream", "mode": *mode, "gzip": *useGzip, "bytes": *nbytes}
	if err != nil {
		statusFields(out, err)
		fail(out, "stream: %v", err)
	}
	// Send and receive at once: neither side may wait for the other (flow control both ways).
	sent := make(chan error, 1)
	go func() {
		up := peer.NewContent(upSeed)
		for i := 0; up.Offset() < *nbytes; i++ {
			n := int64(peer.ChunkSize(upSeed, i))
			if left := *nbytes - up.Offset(); n > left {
				n = left
			}
			buf := make(peer.Raw, n)
			up.Next(buf)
			if err := s.SendMsg(&buf); err != nil {
				sent <- err
				return
			}
		}
		sent <- s.CloseSend()
	}()
	downSeedUsed := uint64(downSeed)
	if *mode == "echo" {
		downSeedUsed = upSeed
	}
	down := peer.NewContent(downSeedUsed)
	msgs := 0
	var recvErr error
	for {
		var m peer.Raw
		if err := s.RecvMsg(&m); err != nil {
			if err != io.EOF {
				recvErr = err
			}
			break
		}
		msgs++
		if down.Offset()+int64(len(m)) > *nbytes {
			cancel()
			fail(out, "received more than %d bytes", *nbytes)
		}
		if err := down.Check(m); err != nil {
			cancel()
			fail(out, "client received wrong content: %v", err)
		}
	}
	sendErr := <-sent
	statusFields(out, recvErr)
	out["received_bytes"] = down.Offset()
	out["received_messages"] = msgs
	out["seconds"] = time.Since(start).Seconds()
	trailer := s.Trailer()
	if recvErr != nil {
		fail(out, "stream ended with %s: %s", out["code"], out["message"])
	}
	if sendErr != nil && !errors.Is(sendErr, io.EOF) {
		fail(out, "sending: %v", sendErr)
	}
	if down.Offset() != *nbytes {
		fail(out, "received %d bytes, want %d", down.Offset(), *nbytes)
	}
	want := map[string]string{"x-recv-bytes": strconv.FormatInt(*nbytes, 10), "x-sent-bytes": strconv.FormatInt(*nbytes, 10)}
	if *mode == "echo" {
		want = map[string]string{"x-echo-bytes": strconv.FormatInt(*nbytes, 10)}
	}
	for k, v := range want {
		if got := first(trailer, k); got != v {
			fail(out, "trailer %s = %q, want %q (trailer %v)", k, got, v, trailer)
		}
	}
	out["ok"] = true
	emit(out)
}

func doError(ctx context.Context, conn *grpc.ClientConn) {
	req, resp := peer.Raw("fail please"), peer.Raw(nil)
	err := conn.Invoke(routed(ctx), "/kasd.test.Echo/Fail", &req, &resp)
	out := map[string]interface{}{"call": "error", "gzip": *useGzip}
	statusFields(out, err)
	if err == nil {
		fail(out, "the call succeeded; want an error status")
	}
	if *expectCode != "" {
		st := status.Convert(err)
		var want codes.Code
		if n, perr := strconv.Atoi(*expectCode); perr == nil {
			want = codes.Code(n)
		} else if uerr := want.UnmarshalJSON([]byte(`"` + *expectCode + `"`)); uerr != nil {
			fail(out, "--expect-code %q: %v", *expectCode, uerr)
		}
		if st.Code() != want {
			fail(out, "status %s, want %s", st.Code(), want)
		}
	}
	if *expectMsg != "" && status.Convert(err).Message() != *expectMsg {
		fail(out, "status message %q, want %q", status.Convert(err).Message(), *expectMsg)
	}
	out["ok"] = true
	emit(out)
}

func doAgents(ctx context.Context, conn *grpc.ClientConn) {
	req := &trackerrpc.GetConnectedAgentsRequest{}
	switch {
	case *agentID != 0:
		req.Request = &trackerrpc.GetConnectedAgentsRequest_AgentId{AgentId: *agentID}
	case *projectID != 0:
		req.Request = &trackerrpc.GetConnectedAgentsRequest_ProjectId{ProjectId: *projectID}
	}
	resp, err := trackerrpc.NewAgentTrackerClient(conn).GetConnectedAgents(ctx, req)
	out := map[string]interface{}{"call": "agents"}
	statusFields(out, err)
	if err != nil {
		fail(out, "GetConnectedAgents: %s: %s", out["code"], out["message"])
	}
	agents := []map[string]interface{}{}
	for _, a := range resp.Agents {
		m := map[string]interface{}{"agent_id": a.AgentId, "project_id": a.ProjectId, "connection_id": a.ConnectionId}
		if a.ConnectedAt != nil {
			m["connected_at"] = a.ConnectedAt.AsTime().Format(time.RFC3339Nano)
		}
		if am := a.AgentMeta; am != nil {
			meta := map[string]interface{}{"version": am.Version, "commit_id": am.CommitId,
				"pod_namespace": am.PodNamespace, "pod_name": am.PodName}
			if kv := am.KubernetesVersion; kv != nil {
				meta["kubernetes_version"] = map[string]string{"major": kv.Major, "minor": kv.Minor,
					"git_version": kv.GitVersion, "platform": kv.Platform}
			}
			m["agent_meta"] = meta
		}
		agents = append(agents, m)
	}
	out["agents"] = agents
	out["ok"] = true
	emit(out)
}
