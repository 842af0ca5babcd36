"""A fault-injecting HTTP proxy for S3 tests and benchmarks, and the endpoints that never answer.

``FaultProxy(upstream_url, latency_s, slowdown, reset)`` listens on 127.0.0.1 and forwards each HTTP/1.1
request of a client connection to the upstream (the moto server) over one upstream connection, after
``latency_s``. Per request, decided by a seeded RNG:
 * ``slowdown``: the share answered ``503 SlowDown`` (S3's throttling answer) without reaching the upstream;
 * ``reset``: the share whose connection is reset (RST): half of them before the request is forwarded, half
   in the middle of the response body (the client has read part of the object).
``counts`` holds the requests per method that reached the proxy (``GET``, ``HEAD``, ``PUT``, ...) and
``faults`` the injected faults. ``silent_endpoint()`` accepts connections and never answers; ``refused_url()``
is a port nothing listens on.
"""
from __future__ import annotations

import collections
import contextlib
import random
import socket
import struct
import threading
import time
from typing import Iterator
from urllib.parse import urlparse

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>")


class _Conn:
    """Buffered reads of HTTP messages from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n"

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("peer closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("peer closed mid-chunk")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def read_body(self, headers: dict[str, str], no_body: bool) -> bytes:
        if no_body:
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = b""
            while True:
                line = self.read_line()
                out += line
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:  # trailers end with an empty line
                    while True:
                        trailer = self.read_line()
                        out += trailer
                        if trailer == b"\r\n":
                            return out
                out += self.read_exact(size + 2)
        return self.read_exact(int(headers.get("content-length", "0")))


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    out = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip().lower()] = v.strip()
    return lines[0], out


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """See the module docstring. Use as a context manager; ``url`` is the endpoint to give S3 clients."""

    def __init__(self, upstream_url: str, latency_s: float = 0.0, slowdown: float = 0.0, reset: float = 0.0,
                 seed: int = 0):
        u = urlparse(upstream_url)
        self.upstream = (u.hostname, u.port)
        self.latency_s, self.slowdown, self.reset = latency_s, slowdown, reset
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self._stop = False

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self.server.close()

    def requests(self, *methods: str) -> int:
        with self.lock:
            return sum(self.counts[m] for m in methods) if methods else sum(self.counts.values())

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _draw(self) -> str:
        with self.lock:
            x = self.rng.random()
        if x < self.slowdown:
            return "slowdown"
        if x < self.slowdown + self.reset:
            return "reset-before" if x < self.slowdown + self.reset / 2 else "reset-mid"
        return "forward"

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        conn = _Conn(client)
        try:
            while True:
                head = conn.read_head()
                if head is None:
                    return
                request_line, headers = _headers(head)
                method = request_line.split(" ", 1)[0]
                body = conn.read_body(headers, no_body=False)
                with self.lock:
                    self.counts[method] += 1
                fault = self._draw()
                if fault != "forward":
                    with self.lock:
                        self.faults[fault] += 1
                if fault == "slowdown":  # a HEAD answer has no body (S3 sends the bare 503)
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
                                   + str(len(SLOWDOWN_BODY)).encode() + b"\r\n\r\n"
                                   + (b"" if method == "HEAD" else SLOWDOWN_BODY))
                    continue
                if fault == "reset-before":
                    _reset(client)
                    return
                if self.latency_s:
                    time.sleep(self.latency_s)
                if upstream is None:
                    upstream = _Conn(socket.create_connection(self.upstream))
                upstream.sock.sendall(head + body)
                response = upstream.read_head()
                if response is None:
                    raise ConnectionError("upstream closed")
                status_line, rheaders = _headers(response)
                status = int(status_line.split(" ")[1])
                rbody = upstream.read_body(rheaders, no_body=method == "HEAD" or status in (204, 304))
                if fault == "reset-mid" and len(rbody) > 1:
                    client.sendall(response + rbody[: len(rbody) // 2])
                    _reset(client)
                    return
                client.sendall(response + rbody)
                if rheaders.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, OSError):
            return
        finally:
            with contextlib.suppress(OSError):
                client.close()
            if upstream is not None:
                with contextlib.suppress(OSError):
                    upstream.sock.close()


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """An endpoint URL that accepts TCP connections and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()
        for s in held:
            s.close()


def refused_url() -> str:
    """An endpoint URL on a free port: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
