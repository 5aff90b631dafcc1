#!/usr/bin/env python3
"""An emulator of GitLab's agentk, for testing kasd's agent listener.

Each emulated pod has one gRPC channel (its own HTTP/2 connection) to the agent listener and
sends `authorization: Bearer <token>` on every call. A pod:

  * registers: AgentRegistrar/Register with an AgentMeta and a random positive int64 pod_id, at
    start and then every `register_interval` seconds (retrying with backoff on failure);
  * keeps at least `idle` reverse tunnels open: ReverseTunnel/Connect streams whose first message
    is ConnectRequest{descriptor{agent_descriptor{services}}}. When fewer than `idle` are idle
    (one was used or ended) it opens more at once (enough to get back to `idle`, or
    `open_batch`); after failures it waits with exponential backoff (`backoff`, default 1 s
    growing to 20 s, like agentk);
  * serves a call when kasd sends ConnectResponse.request_info on a tunnel: the handler
    registered for the method name answers with header, messages and trailer (or an error), the
    agent half-closes, and the tunnel is finished (one tunnel carries at most one call).

Default handlers (service "test.Echo"):
    /test.Echo/Unary   after close_send: header, one message per request message, trailer
    /test.Echo/Stream  header at once, each message echoed as it arrives, trailer after close_send
    /test.Echo/Fail    Error{status{code=9 (FAILED_PRECONDITION), message="failed by agent"}}
    /test.Echo/Meta    after close_send: header, one message with the request metadata as lines
                       b"key=v1,v2\\n" (keys sorted; -bin values as raw bytes), trailer
    /test.Echo/Slow    reads the first message (ASCII seconds, e.g. b"1.5"), waits that long (or
                       until the call is cancelled), then echoes like Stream
Headers carry {"x-agent-pod": [pod name]} plus every request key starting with "x-echo-";
trailers carry {"x-echo-count": [number of messages echoed]}.

Library use (from a test; see AgentK for all parameters):

    agent = AgentK("127.0.0.1:8150", "token", pods=2, idle=2)
    agent.handlers["/test.Echo/Custom"] = lambda call: ...   # before start(); see TunnelCall
    agent.start()
    agent.wait_for(lambda s: s["calls_served"] >= 1, timeout=10)
    print(agent.stats)
    agent.stop()          # graceful; agent.kill() drops every stream and connection at once

Protocol violations for negative tests: AgentK(violation=MODE) or set agent.violation later (it
applies to tunnels opened / calls served afterwards); MODE is one of VIOLATIONS.

Command line (runs until SIGTERM/SIGINT, then stops gracefully and prints stats as JSON):

    python3 agentk.py --addr 127.0.0.1:8150 --token T --pods 2

Standard library + grpcio + protobuf only; the messages come from kaspb (generated from proto/).
"""
import argparse
import json
import logging
import os
import queue
import random
import signal
import sys
import threading
import time

import grpc
from google.protobuf.message import DecodeError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kaspb  # noqa: E402

log = logging.getLogger("agentk")

# Protocol violations the emulator can commit, for kasd's negative tests.
VIOLATIONS = {
    # -- at tunnel start (instead of a single well-formed descriptor) --
    "message_before_descriptor": "send Message{data} and then the descriptor",
    "header_before_descriptor": "send Header{} and then the descriptor",
    "double_descriptor": "send the descriptor twice",
    "empty_service_name": "descriptor with an extra Service whose name is empty",
    "empty_method_name": "descriptor with an extra Method whose name is empty",
    "empty_request_first": "first message is ConnectRequest{} (no oneof field set)",
    "garbage_first": "first message is bytes that do not parse as protobuf",
    "close_before_descriptor": "half-close the stream without sending anything",
    # -- while serving a call --
    "header_twice": "send Header twice",
    "message_before_header": "never send Header: messages and trailer come first",
    "message_after_trailer": "send one more Message after the Trailer",
    "trailer_twice": "send Trailer twice",
    "descriptor_during_call": "send the descriptor again right after request_info",
}
_START_VIOLATIONS = {"message_before_descriptor", "header_before_descriptor", "double_descriptor",
                     "empty_service_name", "empty_method_name", "empty_request_first",
                     "garbage_first", "close_before_descriptor"}

_END = object()            # request-queue sentinel: half-close the Connect stream
DEFAULT_AGENT_META = dict(version="v17.0.0-kasd-emulator", commit_id="0000000000000000",
                          pod_namespace="gitlab-agent",
                          kubernetes_version=dict(major="1", minor="29", git_version="v1.29.0",
                                                  platform="linux/amd64"))


class CallCancelled(Exception):
    """The tunnel stream ended (kasd reset it, or the agent was killed) during a call."""


# --- ConnectResponse decoding -----------------------------------------------------------------

def _meta_values(key, vals):
    """Request metadata values: bytes for binary ("-bin") keys, str otherwise."""
    if key.endswith("-bin"):
        return [v if isinstance(v, bytes) else v.encode() for v in vals]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in vals]


def decode_connect_response(data):
    """Deserialize a ConnectResponse into a tuple; never raises (grpcio would fail the call):
        ("request_info", method_name, {key: [values]})
        ("message", data) | ("close_send",) | ("empty",) | ("invalid", raw bytes)
    Parsed with protobuf (strict), except a request_info whose metadata holds non-UTF-8 bytes
    (binary values), which the protobuf runtime refuses: that one is decoded by hand."""
    raw, utf8 = _decode_connect_response_raw(data)
    if raw[0] == "request_info" and not utf8:
        return raw
    try:
        r = kaspb.tunnel_rpc.ConnectResponse.FromString(data)
    except DecodeError:
        return raw if raw[0] != "empty" else ("invalid", data)
    kind = r.WhichOneof("msg")
    if kind == "request_info":
        meta = {k: _meta_values(k, v.value) for k, v in r.request_info.meta.items()}
        return ("request_info", r.request_info.method_name, meta)
    if kind == "message":
        return ("message", r.message.data)
    if kind == "close_send":
        return ("close_send",)
    return ("empty",)


def _decode_connect_response_raw(data):
    """Hand decoder: (tuple as above, whether every string in a request_info is UTF-8)."""
    def is_utf8(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    try:
        result, utf8 = ("empty",), True
        for num, wt, val in kaspb.iter_fields(data):
            if num == 1 and wt == 2:
                method, entries = b"", []
                for n2, w2, v2 in kaspb.iter_fields(val):
                    if n2 == 1 and w2 == 2:
                        method = v2
                    elif n2 == 2 and w2 == 2:
                        entries.append(v2)
                raw_meta = kaspb.decode_meta_entries(entries)
                utf8 = is_utf8(method) and all(is_utf8(k.encode()) and all(map(is_utf8, vs))
                                               for k, vs in raw_meta.items())
                meta = {k: _meta_values(k, v) for k, v in raw_meta.items()}
                result = ("request_info", method.decode("utf-8", "replace"), meta)
            elif num == 2 and wt == 2:
                payload = b"".join(v for n2, w2, v in kaspb.iter_fields(val) if n2 == 1)
                result = ("message", payload)
            elif num == 3 and wt == 2:
                result = ("close_send",)
        return result, utf8
    except ValueError:
        return ("invalid", data), True


def _serialize(m):
    """Request serializer: protobuf messages, or bytes passed through as they are."""
    return m if isinstance(m, bytes) else m.SerializeToString()


def _meta_request(field, meta):
    """A serialized ConnectRequest with Header (field 2) or Trailer (field 4) carrying meta.
    Built by hand when a value is bytes (binary metadata need not be UTF-8)."""
    items = list(meta.items()) if meta else []
    if any(isinstance(v, bytes) or (isinstance(v, (list, tuple)) and
                                    any(isinstance(x, bytes) for x in v)) for _, v in items):
        return kaspb._len_field(field, kaspb.encode_meta_map(1, items))
    req = kaspb.tunnel_rpc.ConnectRequest()
    sub = req.header if field == 2 else req.trailer
    sub.SetInParent()
    kaspb.dict_to_meta(sub.meta, items)
    return req


# --- one call served on a tunnel --------------------------------------------------------------

class TunnelCall:
    """What a handler gets: the call kasd sent down a tunnel, and the means to answer it.

    Attributes: method ("/pkg.Service/Method"), meta ({key: [str]}, bytes values for "-bin"
    keys), pod (the Pod serving it), agent (the AgentK), cancelled (threading.Event set when the
    tunnel stream ended under the call).
    Reading: recv(timeout=None) returns the next request message (bytes), or None once kasd sent
    close_send; iterating the call yields messages until close_send. Both raise CallCancelled if
    the stream ended first.
    Answering: send_header(meta), send_message(data), send_trailer(meta) or
    send_error(code, message). A handler that returns without a trailer or error gets a trailer
    (and a header if none was sent) added for it; one that raises gets Error{INTERNAL}."""

    def __init__(self, tunnel, method, meta):
        self.tunnel = tunnel
        self.pod = tunnel.pod
        self.agent = tunnel.pod.agent
        self.method = method
        self.meta = meta
        self.cancelled = threading.Event()
        self.header_sent = False
        self.finished = False
        self.messages_received = 0
        self.messages_sent = 0
        self._in = queue.Queue()
        self._closed = False        # close_send consumed by recv()
        self._closed_seen = False   # close_send received from kasd
        self._violation = tunnel.violation

    # reading
    def recv(self, timeout=None):
        if self._closed:
            return None
        try:
            item = self._in.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no request message within {timeout} s") from None
        if item[0] == "message":
            self.messages_received += 1
            return item[1]
        if item[0] == "close_send":
            self._closed = True
            return None
        self._in.put(item)  # "end": keep it for later reads
        raise CallCancelled(item[1])

    def __iter__(self):
        while True:
            m = self.recv()
            if m is None:
                return
            yield m

    # answering
    def _send(self, item):
        if self.cancelled.is_set():
            raise CallCancelled("tunnel stream ended")
        self.tunnel.send(item)

    def send_header(self, meta=None):
        if self._violation == "message_before_header":
            self.header_sent = True  # pretend; the violation is never sending it
            self.agent._count("violations_sent")
            return
        self._send(_meta_request(2, meta))
        if self._violation == "header_twice":
            self._send(_meta_request(2, meta))
            self.agent._count("violations_sent")
        self.header_sent = True

    def send_message(self, data):
        req = kaspb.tunnel_rpc.ConnectRequest()
        req.message.data = bytes(data)
        self._send(req)
        self.messages_sent += 1

    def send_trailer(self, meta=None):
        if not self.header_sent:
            self.send_header()
        self._send(_meta_request(4, meta))
        if self._violation == "trailer_twice":
            self._send(_meta_request(4, meta))
            self.agent._count("violations_sent")
        if self._violation == "message_after_trailer":
            req = kaspb.tunnel_rpc.ConnectRequest()
            req.message.data = b"after trailer"
            self._send(req)
            self.agent._count("violations_sent")
        self.finished = True

    def send_error(self, code, message="", details=()):
        """Final status of the call: code is an int or a grpc.StatusCode; details are
        google.protobuf.Any messages."""
        if isinstance(code, grpc.StatusCode):
            code = code.value[0]
        req = kaspb.tunnel_rpc.ConnectRequest()
        req.error.status.code = int(code)
        req.error.status.message = message
        for d in details:
            req.error.status.details.add().CopyFrom(d)
        self._send(req)
        self.finished = True

    def _echo_header(self):
        meta = {"x-agent-pod": [self.pod.name]}
        for k, v in self.meta.items():
            if k.startswith("x-echo-"):
                meta[k] = list(v)
        return meta


# --- default handlers -------------------------------------------------------------------------

def handle_unary(call):
    """Collect every request message until close_send, then answer header, the same messages,
    trailer."""
    msgs = list(call)
    call.send_header(call._echo_header())
    for m in msgs:
        call.send_message(m)
    call.send_trailer({"x-echo-count": [str(len(msgs))]})


def handle_stream(call):
    """Header at once, echo every message as it arrives, trailer after close_send."""
    call.send_header(call._echo_header())
    n = 0
    for m in call:
        call.send_message(m)
        n += 1
    call.send_trailer({"x-echo-count": [str(n)]})


def handle_fail(call):
    """Fail the call: FAILED_PRECONDITION (9), "failed by agent"."""
    call.send_error(9, "failed by agent")


def handle_meta(call):
    """Wait for close_send, then answer one message listing the request metadata, one
    b"key=v1,v2\\n" line per key, sorted by key."""
    for _ in call:
        pass
    lines = b"".join(
        k.encode() + b"=" + b",".join(v if isinstance(v, bytes) else v.encode() for v in vals)
        + b"\n" for k, vals in sorted(call.meta.items()))
    call.send_header(call._echo_header())
    call.send_message(lines)
    call.send_trailer({"x-echo-count": ["1"]})


def handle_slow(call):
    """Read the first message (seconds, ASCII), wait that long, then echo like Stream (the first
    message included). Cancellation during the wait ends the handler (CallCancelled)."""
    first = call.recv()
    try:
        delay = float(first.decode().strip()) if first else 0.0
    except ValueError:
        delay = 0.0
    if call.cancelled.wait(delay):
        raise CallCancelled("cancelled while waiting")
    call.send_header(call._echo_header())
    n = 0
    if first is not None:
        call.send_message(first)
        n = 1
        for m in call:
            call.send_message(m)
            n += 1
    call.send_trailer({"x-echo-count": [str(n)]})


DEFAULT_HANDLERS = {
    "/test.Echo/Unary": handle_unary,
    "/test.Echo/Stream": handle_stream,
    "/test.Echo/Fail": handle_fail,
    "/test.Echo/Meta": handle_meta,
    "/test.Echo/Slow": handle_slow,
}


def services_from_handlers(handlers):
    """{"/pkg.Svc/Method": fn, ...} -> {"pkg.Svc": ["Method", ...]} (in registration order)."""
    out = {}
    for name in handlers:
        svc, _, method = name.lstrip("/").partition("/")
        out.setdefault(svc, []).append(method)
    return out


# --- tunnels ----------------------------------------------------------------------------------

class _Tunnel:
    """One ReverseTunnel/Connect stream of a pod (thread-driven)."""

    def __init__(self, pod, seq):
        self.pod = pod
        self.seq = seq
        self.violation = pod.agent.violation
        self.out = queue.Queue()
        self.done = threading.Event()
        self.grpc_call = None
        self.call = None          # TunnelCall once used
        self.used = False
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"agentk-{pod.index}-tunnel-{seq}")

    def send(self, item):
        self.out.put(item)

    def half_close(self):
        self.out.put(_END)

    def cancel(self):
        c = self.grpc_call
        if c is not None:
            c.cancel()

    def _requests(self):
        while True:
            try:
                item = self.out.get(timeout=0.2)
            except queue.Empty:
                if self.done.is_set():
                    return
                continue
            if item is _END:
                return
            yield item

    def _opening_messages(self):
        agent = self.pod.agent
        v = self.violation if self.violation in _START_VIOLATIONS else None
        desc = agent.descriptor_request()
        if v:
            agent._count("violations_sent")
        if v is None:
            return [desc]
        if v == "message_before_descriptor":
            early = kaspb.tunnel_rpc.ConnectRequest()
            early.message.data = b"early"
            return [early, desc]
        if v == "header_before_descriptor":
            h = kaspb.tunnel_rpc.ConnectRequest()
            h.header.SetInParent()
            return [h, desc]
        if v == "double_descriptor":
            return [desc, desc]
        if v == "empty_service_name":
            bad = kaspb.tunnel_rpc.ConnectRequest()
            bad.CopyFrom(desc)
            bad.descriptor.agent_descriptor.services.add(name="").methods.add(name="Method")
            return [bad]
        if v == "empty_method_name":
            bad = kaspb.tunnel_rpc.ConnectRequest()
            bad.CopyFrom(desc)
            bad.descriptor.agent_descriptor.services.add(name="test.Bad").methods.add(name="")
            return [bad]
        if v == "empty_request_first":
            return [kaspb.tunnel_rpc.ConnectRequest(), desc]
        if v == "garbage_first":
            return [b"\xff\xff\xff\xff\xff", desc]
        if v == "close_before_descriptor":
            return []
        raise ValueError(f"unknown violation {v!r}")

    def _run(self):
        pod, agent = self.pod, self.pod.agent
        code, details = None, ""
        try:
            for m in self._opening_messages():
                self.out.put(m)
            if self.violation == "close_before_descriptor":
                self.out.put(_END)
            self.grpc_call = pod.connect(self._requests(), metadata=agent.call_metadata())
            if pod.closing:
                self.grpc_call.cancel()
            for resp in self.grpc_call:
                self._on_response(resp)
            code = self.grpc_call.code()
            details = self.grpc_call.details() or ""
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = (e.details() if hasattr(e, "details") else str(e)) or ""
        except Exception as e:  # noqa: BLE001 - keep the emulator alive, but record it
            log.exception("tunnel %s: unexpected error", self.thread.name)
            code, details = grpc.StatusCode.UNKNOWN, f"emulator error: {e}"
        finally:
            self.done.set()
            if self.call is not None:
                self.call.cancelled.set()
                self.call._in.put(("end", f"{code}: {details}"))
            pod.tunnel_ended(self, code, details)

    def _on_response(self, resp):
        agent = self.pod.agent
        kind = resp[0]
        if self.call is None:
            if kind != "request_info":
                agent._protocol_error(f"first ConnectResponse is {kind}, not request_info")
                self.cancel()
                return
            _, method, meta = resp
            self.used = True
            self.call = TunnelCall(self, method, meta)
            self.pod.tunnel_used(self)
            agent._count("calls_started")
            agent._count_method(method)
            if self.violation == "descriptor_during_call":
                self.send(agent.descriptor_request())
                agent._count("violations_sent")
            threading.Thread(target=self._serve, daemon=True,
                             name=self.thread.name + "-call").start()
            return
        if kind == "message":
            if self.call._closed_seen:
                agent._protocol_error("message after close_send")
            self.call._in.put(("message", resp[1]))
        elif kind == "close_send":
            if self.call._closed_seen:
                agent._protocol_error("close_send twice")
            self.call._closed_seen = True
            self.call._in.put(("close_send",))
        else:
            agent._protocol_error(f"unexpected ConnectResponse during a call: {kind}")

    def _serve(self):
        call, agent = self.call, self.pod.agent
        handler = agent.handlers.get(call.method)
        try:
            if handler is None:
                call.send_error(grpc.StatusCode.UNIMPLEMENTED,
                                f"agentk emulator: no handler for {call.method}")
            else:
                handler(call)
                if not call.finished:
                    call.send_trailer()
            agent._count("calls_served")
        except CallCancelled:
            agent._count("calls_cancelled")
        except Exception as e:  # noqa: BLE001
            log.exception("handler for %s failed", call.method)
            agent._count("handler_errors")
            if not call.finished and not call.cancelled.is_set():
                try:
                    call.send_error(grpc.StatusCode.INTERNAL, f"handler failed: {e}")
                except CallCancelled:
                    pass
        finally:
            self.half_close()
            # kasd should now end the stream; don't hold it forever if it does not.
            if not self.done.wait(agent.linger):
                agent._protocol_error("stream not ended by kasd after the call finished")
                self.cancel()


# --- pods -------------------------------------------------------------------------------------

class Pod:
    """One emulated agentk process: a channel, a pod_id, registration, and a pool of tunnels."""

    def __init__(self, agent, index):
        self.agent = agent
        self.index = index
        self.pod_id = random.getrandbits(63) or 1
        self.name = f"agentk-{index}-{self.pod_id % 100000:05d}"
        self.channel = None
        self.idle = set()
        self.busy = set()
        self.failures = 0
        self.next_open = 0.0
        self.closing = False
        self.cond = threading.Condition()
        self.stopped = threading.Event()
        self._seq = 0
        self._threads = []

    def agent_meta(self):
        m = kaspb.entity.AgentMeta()
        spec = dict(DEFAULT_AGENT_META)
        spec.update(self.agent.agent_meta)
        kv = spec.pop("kubernetes_version", None) or {}
        for k, v in spec.items():
            setattr(m, k, v)
        if not m.pod_name:
            m.pod_name = self.name
        for k, v in kv.items():
            setattr(m.kubernetes_version, k, v)
        return m

    def start(self):
        self.channel = self.agent._make_channel()
        self.connect = self.channel.stream_stream(
            kaspb.METHOD_CONNECT, request_serializer=_serialize,
            response_deserializer=decode_connect_response)
        self.register_rpc = self.channel.unary_unary(
            kaspb.METHOD_REGISTER, request_serializer=_serialize,
            response_deserializer=kaspb.registrar_rpc.RegisterResponse.FromString)
        if self.agent.register:
            self._spawn(self._register_loop, "register")
        self._spawn(self._pool_loop, "pool")

    def _spawn(self, fn, what):
        t = threading.Thread(target=fn, daemon=True, name=f"agentk-{self.index}-{what}")
        self._threads.append(t)
        t.start()

    def _register_loop(self):
        agent = self.agent
        failures = 0
        while not self.stopped.is_set():
            req = kaspb.registrar_rpc.RegisterRequest(agent_meta=self.agent_meta(),
                                                      pod_id=self.pod_id)
            try:
                self.register_rpc(req, metadata=agent.call_metadata(), timeout=10)
                agent._count("registers")
                failures = 0
                wait = agent.register_interval
            except grpc.RpcError as e:
                if self.stopped.is_set():
                    return
                agent._count_code("register_errors", e.code())
                failures += 1
                wait = agent._backoff(failures)
            self.stopped.wait(wait)

    def _pool_loop(self):
        agent = self.agent
        with self.cond:
            while not self.stopped.is_set() and not self.closing:
                now = time.monotonic()
                need = agent.idle - len(self.idle)
                if need > 0 and agent.open_batch:
                    need = max(need, agent.open_batch)
                room = agent.max_streams - len(self.idle) - len(self.busy)
                if need > 0 and room > 0 and now >= self.next_open:
                    for _ in range(min(need, room)):
                        self._open()
                    continue
                timeout = max(0.01, self.next_open - now) if need > 0 and room > 0 else 1.0
                self.cond.wait(timeout)

    def _open(self):
        self._seq += 1
        t = _Tunnel(self, self._seq)
        self.idle.add(t)
        self.agent._count("tunnels_opened")
        t.thread.start()

    def tunnel_used(self, t):
        with self.cond:
            self.idle.discard(t)
            self.busy.add(t)
            self.failures = 0
            self.next_open = 0.0
            self.cond.notify_all()

    def tunnel_ended(self, t, code, details):
        agent = self.agent
        agent._count("tunnels_closed")
        agent._count_code("tunnel_end_codes", code)
        with agent._lock:
            agent.tunnel_ends.append({"time": time.monotonic(), "pod": self.index, "seq": t.seq,
                                      "used": t.used, "started": t.started,
                                      "code": code.name if isinstance(code, grpc.StatusCode) else str(code)})
        if code is not None and code != grpc.StatusCode.OK:
            agent._set_last_error(f"{code.name}: {details}")
        with self.cond:
            self.idle.discard(t)
            self.busy.discard(t)
            if not t.used and not self.closing:
                lifetime = time.monotonic() - t.started
                if code != grpc.StatusCode.OK or lifetime < 1.0:
                    self.failures += 1
                    self.next_open = time.monotonic() + agent._backoff(self.failures)
                else:
                    self.failures = 0
            self.cond.notify_all()

    def counts(self):
        with self.cond:
            return len(self.idle), len(self.busy)

    def stop(self, timeout):
        """Graceful, like agentk on SIGTERM: no new tunnels, cancel idle ones (RST_STREAM), let
        calls in progress finish (up to timeout), then close the channel."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            idle = list(self.idle)
        for t in idle:
            t.cancel()
        with self.cond:
            while (self.idle or self.busy) and time.monotonic() < deadline:
                self.cond.wait(max(0.01, deadline - time.monotonic()))
        self.stopped.set()
        self.close_channel()

    def kill(self):
        """Abrupt: close the channel now (every stream is reset, the connection dropped)."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.stopped.set()
        self.close_channel()

    def close_channel(self):
        if self.channel is not None:
            self.channel.close()


# --- the agent --------------------------------------------------------------------------------

class AgentK:
    """Emulated agentk with `pods` pods against kasd's agent listener at `addr`.

    Parameters:
        addr, token         listener address ("127.0.0.1:8150") and agent token (None: no
                            authorization metadata at all)
        pods, idle          number of pods; minimum idle tunnels per pod (default 2)
        services            {"pkg.Service": ["Method", ...]} for the descriptor; default: derived
                            from the handlers
        handlers            extra/overriding handlers {"/pkg.Service/Method": fn(TunnelCall)}
                            merged over DEFAULT_HANDLERS (also editable via .handlers before
                            start())
        violation           one of VIOLATIONS, or None
        register            call Register at start and every register_interval seconds
        backoff             (initial, max) reconnect backoff in seconds, default (1, 20)
        max_streams         tunnels per pod, at most (default 500)
        open_batch          when fewer than `idle` are idle, open this many (real agentk: 10);
                            default None: just enough to get back to `idle`
        agent_meta          overrides for AgentMeta fields (version, commit_id, pod_namespace,
                            pod_name, kubernetes_version={major, minor, git_version, platform})
        root_certificates   PEM bytes: use TLS with these roots (default: plaintext h2c)
        server_name         TLS server name override
        extra_metadata      (key, value) pairs added to every call
        linger              seconds to wait for kasd to end a stream after a served call

    Methods: start(), stop(timeout=5), kill(), wait_for(pred, timeout), idle_counts().
    Property stats: dict snapshot of counters (see _new_stats())."""

    def __init__(self, addr, token, pods=1, idle=2, services=None, handlers=None, violation=None,
                 register=True, register_interval=300.0, backoff=(1.0, 20.0), max_streams=500,
                 open_batch=None,
                 agent_meta=None, root_certificates=None, server_name=None, extra_metadata=(),
                 linger=10.0, compression=None, shared_connection=False):
        if violation is not None and violation not in VIOLATIONS:
            raise ValueError(f"unknown violation {violation!r}; one of {sorted(VIOLATIONS)}")
        self.addr = addr
        self.token = token
        # grpc.Compression.Gzip: every call compressed, as real agentk (grpc-go, gzip by default)
        self.compression = compression
        # shared_connection: grpcio's global subchannel pool, so every AgentK (and pod) dialling
        # the same address with the same options rides one HTTP/2 connection, as agents behind an
        # L7 proxy that multiplexes them on one upstream connection do
        self.shared_connection = shared_connection
        self.idle = idle
        self.handlers = dict(DEFAULT_HANDLERS)
        self.handlers.update(handlers or {})
        self.services = services
        self.violation = violation
        self.register = register
        self.register_interval = register_interval
        self.backoff = backoff
        self.max_streams = max_streams
        self.open_batch = open_batch
        self.agent_meta = dict(agent_meta or {})
        self.root_certificates = root_certificates
        self.server_name = server_name
        self.extra_metadata = list(extra_metadata)
        self.linger = linger
        self.pods = [Pod(self, i) for i in range(pods)]
        self._lock = threading.Lock()
        self._stats = self._new_stats()
        # every ended tunnel stream, in order: {time, pod, seq, used, started, code (status name)}
        self.tunnel_ends = []
        self._started = False

    @staticmethod
    def _new_stats():
        return {
            "tunnels_opened": 0,        # Connect streams started
            "tunnels_closed": 0,        # Connect streams ended (any reason)
            "calls_started": 0,         # request_info received
            "calls_served": 0,          # handler finished (trailer or error sent)
            "calls_cancelled": 0,       # stream ended under a call in progress
            "handler_errors": 0,
            "calls_by_method": {},
            "tunnel_end_codes": {},     # grpc status name -> count
            "registers": 0,
            "register_errors": {},      # grpc status name -> count
            "violations_sent": 0,
            "kasd_protocol_errors": [],  # what kasd did out of order (last 50)
            "last_error": "",
        }

    # configuration helpers
    def descriptor_request(self):
        """The ConnectRequest{descriptor} this agent opens every tunnel with."""
        services = self.services if self.services is not None \
            else services_from_handlers(self.handlers)
        req = kaspb.tunnel_rpc.ConnectRequest()
        ad = req.descriptor.agent_descriptor
        ad.SetInParent()
        items = services.items() if hasattr(services, "items") else services
        for svc, methods in items:
            s = ad.services.add(name=svc)
            for m in methods:
                s.methods.add(name=m)
        return req

    def call_metadata(self):
        md = []
        if self.token is not None:
            md.append(("authorization", f"Bearer {self.token}"))
        return md + self.extra_metadata

    def _make_channel(self):
        # agentk (grpc-go) receives messages up to 10 MiB and sends any size: the same here, so
        # a tunnel message kasd sends at the limit plus its wrapping is judged as agentk would.
        opts = [("grpc.use_local_subchannel_pool", 0 if self.shared_connection else 1),  # 1: one per pod
                ("grpc.max_receive_message_length", 10 << 20),
                ("grpc.max_send_message_length", -1),
                ("grpc.enable_retries", 0)]
        if self.root_certificates is not None:
            if self.server_name:
                opts.append(("grpc.ssl_target_name_override", self.server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
            return grpc.secure_channel(self.addr, creds, options=opts, compression=self.compression)
        return grpc.insecure_channel(self.addr, options=opts, compression=self.compression)

    def _backoff(self, failures):
        lo, hi = self.backoff
        d = min(hi, lo * (2 ** max(0, failures - 1)))
        return d * random.uniform(0.9, 1.1)

    # stats
    def _count(self, key, n=1):
        with self._lock:
            self._stats[key] += n

    def _count_code(self, key, code):
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        with self._lock:
            d = self._stats[key]
            d[name] = d.get(name, 0) + 1

    def _count_method(self, method):
        with self._lock:
            d = self._stats["calls_by_method"]
            d[method] = d.get(method, 0) + 1

    def _protocol_error(self, what):
        log.warning("kasd protocol error: %s", what)
        with self._lock:
            errs = self._stats["kasd_protocol_errors"]
            errs.append(what)
            del errs[:-50]

    def _set_last_error(self, what):
        with self._lock:
            self._stats["last_error"] = what

    @property
    def stats(self):
        """A snapshot of the counters, plus current "tunnels_idle"/"tunnels_busy" totals."""
        with self._lock:
            s = json.loads(json.dumps(self._stats))
        idle = busy = 0
        for p in self.pods:
            i, b = p.counts()
            idle += i
            busy += b
        s["tunnels_idle"] = idle
        s["tunnels_busy"] = busy
        return s

    def idle_counts(self):
        """Idle tunnels (opened, unused, not ended) per pod, as the agent sees them."""
        return [p.counts()[0] for p in self.pods]

    def wait_for(self, predicate, timeout=10.0, interval=0.02):
        """Poll predicate(stats) until true; return the last stats; raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats
            if predicate(s):
                return s
            if time.monotonic() >= deadline:
                raise TimeoutError(f"agentk: condition not met in {timeout} s; stats={s}")
            time.sleep(interval)

    # lifecycle
    def start(self):
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        for p in self.pods:
            p.start()
        return self

    def stop(self, timeout=5.0):
        """Graceful stop: stop opening tunnels and registering, cancel idle tunnels, let calls
        in progress finish (up to timeout), then close the channels."""
        deadline = time.monotonic() + timeout
        threads = [threading.Thread(target=p.stop, args=(max(0.0, deadline - time.monotonic()),))
                   for p in self.pods]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def kill(self):
        """Abrupt stop: close every channel at once (streams reset, connections dropped). For a
        disconnect without even RST_STREAM, run the CLI in a subprocess and SIGKILL it."""
        for p in self.pods:
            p.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description="Emulate GitLab agentk pods against kasd.")
    ap.add_argument("--addr", required=True, help="kasd agent listener, host:port")
    tok = ap.add_mutually_exclusive_group(required=True)
    tok.add_argument("--token", help="agent token")
    tok.add_argument("--token-file", help="file holding the agent token")
    ap.add_argument("--pods", type=int, default=1)
    ap.add_argument("--idle", type=int, default=2, help="minimum idle tunnels per pod")
    ap.add_argument("--open-batch", type=int, default=None,
                    help="tunnels to open when fewer than --idle are idle (agentk: 10)")
    ap.add_argument("--register-interval", type=float, default=300.0)
    ap.add_argument("--backoff", type=float, nargs=2, default=(1.0, 20.0),
                    metavar=("INITIAL", "MAX"))
    ap.add_argument("--violation", choices=sorted(VIOLATIONS))
    ap.add_argument("--ca", help="PEM file with root certificates: use TLS")
    ap.add_argument("--server-name", help="TLS server name override")
    ap.add_argument("--stats-interval", type=float, default=0,
                    help="print stats as JSON every this many seconds (0: only at exit)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = a.token
    if a.token_file:
        with open(a.token_file) as f:
            token = f.read().strip()
    roots = None
    if a.ca:
        with open(a.ca, "rb") as f:
            roots = f.read()
    agent = AgentK(a.addr, token, pods=a.pods, idle=a.idle, violation=a.violation,
                   open_batch=a.open_batch,
                   register_interval=a.register_interval, backoff=tuple(a.backoff),
                   root_certificates=roots, server_name=a.server_name)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    print(json.dumps({"event": "started", "pods": [{"pod_id": p.pod_id, "pod_name": p.name}
                                                   for p in agent.pods]}), flush=True)
    next_stats = time.monotonic() + a.stats_interval
    while not stop.wait(0.2):
        if a.stats_interval and time.monotonic() >= next_stats:
            next_stats += a.stats_interval
            print(json.dumps({"event": "stats", **agent.stats}), flush=True)
    agent.stop()
    print(json.dumps({"event": "stopped", **agent.stats}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
