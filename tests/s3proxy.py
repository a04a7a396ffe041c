"""A loopback HTTP proxy in front of the moto S3 server that can answer like a struggling S3.

Every request is forwarded unchanged (method, path, headers, body) to moto, except that with
`fail_every = N > 0` every Nth request is answered by the proxy itself with S3's throttling and
server errors instead — `503 SlowDown` and `500 InternalError`, alternately, with S3's XML
error body — so the clients' retry-with-backoff is exercised for real.

Conditional writes (a PUT or DELETE with If-None-Match / If-Match) are forwarded one at a time:
moto checks the precondition and then stores, in separate steps of whichever server thread has
the request, so two racing `If-None-Match: *` PUTs could both succeed there (seen on a loaded CI
machine: two runs acquired `_lock`). S3 applies a conditional write atomically; serialising
them here gives the lock tests S3's guarantee instead of moto's race.

The test session points every S3 client (tests, the job's driver, Ray workers) at the proxy;
it listens on 127.0.0.1 only and is stopped with the session.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERRORS = [
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FlakyS3Proxy:
    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.fail_every = 0
        self.requests = 0
        self.injected = 0
        self._lock = threading.Lock()
        self._conditional = threading.Lock()  # one conditional write at a time (module docstring)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-s3-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FlakyS3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _verdict(self) -> tuple[int, str, str] | None:
        """The error to answer with for this request, or None to forward it."""
        with self._lock:
            self.requests += 1
            if self.fail_every and self.requests % self.fail_every == 0:
                self.injected += 1
                return ERRORS[self.injected % len(ERRORS)]
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: pytest shows failures, not traffic
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                verdict = proxy._verdict()
                if verdict is not None:
                    status, code, message = verdict
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>flaky-proxy</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conditional = self.command in ("PUT", "DELETE") and (
                    "If-None-Match" in self.headers or "If-Match" in self.headers
                )
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    with proxy._conditional if conditional else contextlib.nullcontext():
                        upstream.request(self.command, self.path, body=body, headers=headers)
                        response = upstream.getresponse()
                        data = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() in HOP_BY_HOP or (key.lower() == "content-length" and self.command != "HEAD"):
                            continue
                        self.send_header(key, value)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler
