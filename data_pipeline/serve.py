"""A small threaded HTTP server on 127.0.0.1 that serves a folder (tests, quickstart, benchmark).

    with serve_folder("images/") as base_url:      # e.g. "http://127.0.0.1:40123"
        ingest(url_list, out)                       # URLs are f"{base_url}/{relative path}"

Only the loopback interface is ever bound. `closed_port()` returns a loopback port nothing listens on,
used to make an "unreachable URL" for the bad-input zoo.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import threading
from typing import Iterator

LOOPBACK = "127.0.0.1"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler without the per-request log lines; serves every file as bytes."""

    extensions_map = {"": "application/octet-stream"}

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        return


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


@contextlib.contextmanager
def serve_folder(folder: str | os.PathLike[str], port: int = 0) -> Iterator[str]:
    """Serve `folder` on http://127.0.0.1:{port} (0 = a free port) in a background thread.

    Yields the base URL without a trailing slash; the server stops when the block exits.
    Raises FileNotFoundError if the folder does not exist.
    """
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"serve_folder: {root!r} is not a directory")
    handler = functools.partial(_QuietHandler, directory=root)
    server = _Server((LOOPBACK, port), handler)
    thread = threading.Thread(target=server.serve_forever, name=f"serve:{root}", daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def closed_port() -> int:
    """A loopback TCP port with no listener (bound once to get a free number, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])
