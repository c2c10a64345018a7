"""A fault-injecting HTTP proxy for tests: sits on 127.0.0.1 in front of an S3 endpoint.

Requests pass through unchanged (same Host header, so AWS SigV4 signatures still verify upstream), except
the first ``times`` requests of a rule's method + key, which get an S3 error response (``503 SlowDown``,
``500 InternalError``) or a connection reset (RST, no response). Every request is counted per
(method, key), so a test can assert how often a client retried.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Hop-by-hop headers are the proxy's own business (RFC 9110 7.6.1); everything else is relayed verbatim.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "transfer-encoding"}

S3_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "unavailable": (503, "ServiceUnavailable", "Service is unable to handle request."),
}
KINDS = (*S3_ERRORS, "reset")


@dataclass(frozen=True)
class Fault:
    """The first ``times`` ``method`` requests of ``key`` (path inside the bucket) fail with ``kind``."""

    key: str
    kind: str
    times: int
    method: str = "GET"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r}: use one of {KINDS}")


def _key_of(path: str) -> tuple[str, str]:
    """(bucket, key) of a path-style S3 request path."""
    parts = unquote(urlsplit(path).path).lstrip("/").split("/", 1)
    return parts[0], parts[1] if len(parts) > 1 else ""


class FaultProxy:
    """``with FaultProxy(upstream, faults) as proxy:`` then point clients at ``proxy.endpoint``."""

    def __init__(self, upstream: str, faults: list[Fault] | tuple[Fault, ...] = ()) -> None:
        parsed = urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port
        self.faults = {(f.method, f.key): f for f in faults}
        self.requests: Counter[tuple[str, str]] = Counter()
        self.injected: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, key: str, method: str = "GET") -> int:
        with self._lock:
            return self.requests[(method, key)]

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _decide(self, method: str, key: str) -> str | None:
        """Count the request; the fault kind to inject, or None to pass it through."""
        with self._lock:
            self.requests[(method, key)] += 1
            fault = self.faults.get((method, key))
            if fault is None or self.injected[(method, key)] >= fault.times:
                return None
            self.injected[(method, key)] += 1
            return fault.kind

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                body = self._read_body()
                bucket, key = _key_of(self.path)
                kind = proxy._decide(self.command, key)
                if kind == "reset":
                    # SO_LINGER 0 makes close() send RST: the client sees "connection reset by peer".
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if kind is not None:
                    status, code, message = S3_ERRORS[kind]
                    payload = (
                        '<?xml version="1.0" encoding="UTF-8"?>\n'
                        f"<Error><Code>{code}</Code><Message>{message}</Message>"
                        f"<Resource>/{bucket}/{key}</Resource><RequestId>faultproxy</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP and name.lower() != "content-length":
                            upstream.putheader(name, value)
                    if body or "content-length" in (k.lower() for k in self.headers):
                        upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body or None)
                    resp = upstream.getresponse()
                    data = resp.read()
                    self.send_response_only(resp.status, resp.reason)
                    for name, value in resp.getheaders():
                        if name.lower() not in _HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay  # noqa: N815 - http.server's naming

        return Handler
