// kasd-goagent: a test agent built on grpc-go and configured as GitLab's agentk configures its
// connection to kas: gzip on every call, 10 MiB messages, keepalive every 55 s even without calls,
// user agent gitlab-agent/<version>/<commit>, a bearer token on every call, and the address
// schemes grpc://, grpcs://, ws://, wss://. It registers (AgentRegistrar/Register), keeps a pool
// of reverse tunnels (ReverseTunnel/Connect) serving the kasd.test.Echo methods (and, with
// --k8s-api URL, KubernetesApi/MakeRequest against that API server, see k8s.go), keeps
// AgentConfiguration/GetConfiguration open, and prints what happens as JSON lines on stdout.
// SIGTERM or SIGINT stops it cleanly (exit 0).
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	_ "kasdpb/all"
	registrar "kasdpb/gitlab/agent/agent_registrar/rpc"
	"kasdpb/gitlab/agent/entity"
	"kasdtest/peer"
)

type agent struct {
	conn     *grpc.ClientConn
	meta     *entity.AgentMeta
	podID    int64
	pool     *pool
	failCode int
	// k8sAPI is the API server KubernetesApi/MakeRequest goes to (--k8s-api), nil when not served.
	k8sAPI    *url.URL
	userAgent string
}

func main() {
	addr := flag.String("addr", "", "kasd agent listener: grpc://, grpcs://, ws:// or wss://host:port")
	token := flag.String("token", "", "agent token (or --token-file)")
	tokenFile := flag.String("token-file", "", "file holding the agent token")
	caFile := flag.String("ca-file", "", "CA certificate(s) for grpcs:// and wss:// (default: system roots)")
	serverName := flag.String("server-name", "", "TLS server name to check (default: the address's host)")
	version := flag.String("version", "v17.0.0-kasd-goagent", "agent version (AgentMeta.version, user agent)")
	commit := flag.String("commit", "0123456789abcdef", "agent commit (AgentMeta.commit_id, user agent)")
	podName := flag.String("pod-name", "", "AgentMeta.pod_name (default: goagent-<pod id>)")
	podNS := flag.String("pod-namespace", "gitlab-agent", "AgentMeta.pod_namespace")
	podID := flag.Int64("pod-id", 0, "pod id to register (default: random, like agentk)")
	keepaliveTime := flag.Duration("keepalive-time", 55*time.Second, "keepalive ping interval (agentk: 55s; grpc-go's minimum is 10s)")
	registerEvery := flag.Duration("register-interval", 5*time.Minute, "re-register this often")
	minIdle := flag.Int("min-idle", 2, "open more tunnels when fewer than this many are idle")
	maxTunnels := flag.Int("max-tunnels", 500, "at most this many tunnel streams")
	openBatch := flag.Int("open-batch", 10, "tunnels opened at once when more are needed")
	configStream := flag.Bool("config-stream", true, "keep AgentConfiguration/GetConfiguration open")
	noGzip := flag.Bool("no-gzip", false, "debugging only: do not compress (real agentk always does)")
	failCode := flag.Int("fail-code", 9, "status code /kasd.test.Echo/Fail answers (default FAILED_PRECONDITION)")
	k8sAPI := flag.String("k8s-api", "", "serve KubernetesApi/MakeRequest on the tunnels against this API server URL (http:// or https://)")
	flag.Parse()

	if *tokenFile != "" {
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			fatal("token file: %v", err)
		}
		*token = strings.TrimSpace(string(b))
	}
	if *addr == "" || *token == "" {
		fatal("--addr and --token or --token-file are required")
	}
	if *podID == 0 {
		rand.Seed(time.Now().UnixNano() ^ int64(os.Getpid()))
		*podID = rand.Int63n(1<<62) + 1
	}
	if *podName == "" {
		*podName = fmt.Sprintf("goagent-%d", *podID)
	}
	userAgent := fmt.Sprintf("gitlab-agent/%s/%s", *version, *commit)
	target, err := peer.ResolveTarget(*addr, *caFile, *serverName, userAgent)
	if err != nil {
		fatal("%v", err)
	}
	callOpts := []grpc.CallOption{grpc.MaxCallRecvMsgSize(peer.MaxMessageSize)}
	if !*noGzip {
		callOpts = append(callOpts, grpc.UseCompressor(gzip.Name))
	}
	opts := append(target.Opts,
		grpc.WithDefaultCallOptions(callOpts...),
		grpc.WithUserAgent(userAgent),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: *keepaliveTime, PermitWithoutStream: true}),
		grpc.WithPerRPCCredentials(peer.TokenCredentials{Token: *token, Secure: target.Secure}),
	)
	conn, err := grpc.Dial(target.Dial, opts...)
	if err != nil {
		fatal("dial: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	a := &agent{
		conn: conn,
		meta: &entity.AgentMeta{
			Version: *version, CommitId: *commit, PodNamespace: *podNS, PodName: *podName,
			KubernetesVersion: &entity.KubernetesVersion{Major: "1", Minor: "29", GitVersion: "v1.29.0", Platform: "linux/amd64"},
		},
		podID:     *podID,
		failCode:  *failCode,
		userAgent: userAgent,
	}
	if *k8sAPI != "" {
		u, err := url.Parse(*k8sAPI)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			fatal("--k8s-api: want an http:// or https:// URL, got %q", *k8sAPI)
		}
		a.k8sAPI = u
	}
	a.pool = newPool(a, *minIdle, *maxTunnels, *openBatch)
	peer.Event("start", map[string]interface{}{"addr": *addr, "pod_id": a.podID, "pod_name": *podName,
		"user_agent": userAgent, "gzip": !*noGzip, "keepalive_time": keepaliveTime.String()})

	var wg sync.WaitGroup
	run := func(f func(context.Context)) {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx) }()
	}
	run(a.watchState)
	run(func(ctx context.Context) { a.registerLoop(ctx, *registerEvery) })
	run(a.pool.run)
	if *configStream {
		run(a.configLoop)
	}

	sig := <-sigs
	peer.Event("stopping", map[string]interface{}{"signal": sig.String()})
	cancel()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		peer.Event("error", map[string]interface{}{"what": "stop", "message": "goroutines still running after 5s"})
	}
	conn.Close()
	peer.Event("stopped", nil)
}

func fatal(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "kasd-goagent: "+format+"\n", args...)
	os.Exit(2)
}

// watchState prints every connectivity state change of the connection to kasd.
func (a *agent) watchState(ctx context.Context) {
	s := a.conn.GetState()
	peer.Event("conn_state", map[string]interface{}{"state": s.String()})
	for a.conn.WaitForStateChange(ctx, s) {
		s = a.conn.GetState()
		peer.Event("conn_state", map[string]interface{}{"state": s.String()})
	}
}

// backoff is agentk's reconnect pacing: 1 s doubling to 20 s, with jitter.
func backoff(failures int) time.Duration {
	d := time.Second
	for i := 1; i < failures && d < 20*time.Second; i++ {
		d *= 2
	}
	if d > 20*time.Second {
		d = 20 * time.Second
	}
	return d/2 + time.Duration(rand.Int63n(int64(d/2)+1))
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func errorEvent(what string, err error) {
	st := status.Convert(err)
	peer.Event("error", map[string]interface{}{"what": what, "code": st.Code().String(), "message": st.Message()})
}

// registerLoop registers the pod at start and every interval, retrying failures with backoff.
func (a *agent) registerLoop(ctx context.Context, interval time.Duration) {
	client := registrar.NewAgentRegistrarClient(a.conn)
	failures, count := 0, 0
	for {
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		_, err := client.Register(cctx, &registrar.RegisterRequest{AgentMeta: a.meta, PodId: a.podID})
		cancel()
		wait := interval
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			errorEvent("register", err)
			wait = backoff(failures)
		} else {
			failures = 0
			count++
			peer.Event("registered", map[string]interface{}{"pod_id": a.podID, "count": count})
		}
		if !sleep(ctx, wait) {
			return
		}
	}
}
