package peer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// WebSocketProtocol is the subprotocol agentk asks for when it carries HTTP/2 over WebSocket.
const WebSocketProtocol = "ws-tunnel"

// MaxMessageSize is agentk's limit on one gRPC message and on one WebSocket message (10 MiB).
const MaxMessageSize = 10 << 20

// TLSConfig is a client TLS configuration trusting caFile (or the system roots when empty),
// checking serverName (or the address's host when empty).
func TLSConfig(caFile, serverName string) (*tls.Config, error) {
	c := &tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no certificate", caFile)
		}
		c.RootCAs = pool
	}
	return c, nil
}

// Target is how to reach kasd for an address URL (grpc://, grpcs://, ws://, wss://): the gRPC
// target, the transport options, and whether gRPC itself provides transport security.
type Target struct {
	Dial   string
	Opts   []grpc.DialOption
	Secure bool
}

// ResolveTarget turns an address URL into a Target the way agentk does: grpc:// and grpcs:// dial
// host:port (grpcs with TLS, ALPN h2, done by gRPC); ws:// and wss:// hand the whole URL to a
// WebSocket dialer (TLS inside the WebSocket dial for wss) and run gRPC in plaintext over it.
func ResolveTarget(addr, caFile, serverName, userAgent string) (*Target, error) {
	u, err := url.Parse(addr)
	if err != nil {
		return nil, fmt.Errorf("invalid address %q: %v", addr, err)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("invalid address %q: want grpc://, grpcs://, ws:// or wss://host:port", addr)
	}
	var tlsConf *tls.Config
	if u.Scheme == "grpcs" || u.Scheme == "wss" {
		if tlsConf, err = TLSConfig(caFile, serverName); err != nil {
			return nil, err
		}
	}
	switch u.Scheme {
	case "grpc":
		return &Target{Dial: u.Host, Opts: []grpc.DialOption{grpc.WithInsecure()}}, nil
	case "grpcs":
		return &Target{Dial: u.Host, Secure: true,
			Opts: []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tlsConf))}}, nil
	case "ws", "wss":
		// The passthrough resolver gives the dialer the URL unchanged (grpc-go 1.33 parses
		// scheme://authority/endpoint, so the authority part is empty).
		d := &websocket.Dialer{
			NetDialContext:    (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			TLSClientConfig:   tlsConf,
			HandshakeTimeout:  10 * time.Second,
			Subprotocols:      []string{WebSocketProtocol},
			EnableCompression: false,
		}
		header := http.Header{"User-Agent": []string{userAgent}}
		dial := func(ctx context.Context, target string) (net.Conn, error) {
			return DialWebSocket(ctx, d, target, header)
		}
		return &Target{Dial: "passthrough:///" + addr,
			Opts: []grpc.DialOption{grpc.WithInsecure(), grpc.WithContextDialer(dial)}}, nil
	}
	return nil, fmt.Errorf("unsupported scheme %q in %q", u.Scheme, addr)
}

// DialWebSocket opens a WebSocket to u with subprotocol ws-tunnel and returns it as a net.Conn
// whose bytes travel in binary messages.
func DialWebSocket(ctx context.Context, d *websocket.Dialer, u string, header http.Header) (net.Conn, error) {
	ws, resp, err := d.DialContext(ctx, u, header)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("websocket %s: %v (HTTP %s)", u, err, resp.Status)
		}
		return nil, fmt.Errorf("websocket %s: %v", u, err)
	}
	if p := ws.Subprotocol(); p != WebSocketProtocol {
		ws.Close()
		return nil, fmt.Errorf("websocket %s: server chose subprotocol %q, want %q", u, p, WebSocketProtocol)
	}
	ws.SetReadLimit(MaxMessageSize)
	Event("ws_connected", map[string]interface{}{"url": u, "subprotocol": ws.Subprotocol()})
	return &wsConn{ws: ws}, nil
}

// wsConn is a WebSocket as a byte stream: Write sends one binary message, Read returns the
// payload of binary messages in order. Text messages are a protocol error.
type wsConn struct {
	ws      *websocket.Conn
	r       io.Reader
	readMu  sync.Mutex
	writeMu sync.Mutex
	once    sync.Once
}

func (c *wsConn) Read(p []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for {
		if c.r == nil {
			typ, r, err := c.ws.NextReader()
			if err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) && ce.Code == websocket.CloseNormalClosure {
					return 0, io.EOF
				}
				return 0, err
			}
			if typ != websocket.BinaryMessage {
				return 0, fmt.Errorf("websocket: unexpected message type %d (want binary)", typ)
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if err == io.EOF {
			c.r = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) Close() error {
	var err error
	c.once.Do(func() {
		c.writeMu.Lock()
		_ = c.ws.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
		c.writeMu.Unlock()
		err = c.ws.Close()
	})
	return err
}

func (c *wsConn) LocalAddr() net.Addr  { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr { return c.ws.RemoteAddr() }

func (c *wsConn) SetDeadline(t time.Time) error {
	if err := c.ws.SetReadDeadline(t); err != nil {
		return err
	}
	return c.ws.SetWriteDeadline(t)
}
func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }

// TokenCredentials sends "authorization: Bearer <token>" on every call.
type TokenCredentials struct {
	Token  string
	Secure bool // require transport security (only when gRPC does the TLS itself)
}

func (t TokenCredentials) GetRequestMetadata(ctx context.Context, uri ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + t.Token}, nil
}

func (t TokenCredentials) RequireTransportSecurity() bool { return t.Secure }
