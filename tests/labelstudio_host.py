"""A real HTTP server standing where Label Studio serves task images, for the backend tests.

``/data/upload/<path under ../shared/datasets>`` needs ``Authorization: Token <token>`` like
Label Studio's uploads; ``/public/...`` needs nothing; ``/redirect?to=URL`` answers 302.
Every request's path and Authorization header is recorded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.conftest import DATASETS

TOKEN = "0123456789abcdef0123456789abcdef01234567"


class ImageHost:
    """The server's address, the extra files it serves and the requests it saw."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.files: dict[str, bytes] = {}  # path -> bytes, besides the datasets
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)


def _handler(host: ImageHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            host.seen.append((self.path, self.headers.get("Authorization")))
            if parts.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", parse_qs(parts.query)["to"][0])
                self.end_headers()
                return
            if parts.path.startswith("/data/upload/"):
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    self.send_error(401)
                    return
                rel = parts.path.removeprefix("/data/upload/")
            elif parts.path.startswith("/public/"):
                rel = parts.path.removeprefix("/public/")
            else:
                self.send_error(404)
                return
            data = host.files.get(rel)
            path = (DATASETS / rel).resolve()
            if data is None and path.is_file() and DATASETS.resolve() in path.parents:
                data = path.read_bytes()
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextmanager
def image_host() -> Iterator[ImageHost]:
    """Serve on a free local port for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    host = ImageHost(server.server_address[1])
    server.RequestHandlerClass = _handler(host)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield host
    finally:
        server.shutdown()
        server.server_close()
