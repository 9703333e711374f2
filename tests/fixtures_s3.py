"""moto's S3 server over HTTP as pytest fixtures, and a fault-injecting proxy in front of it
(load with `pytest_plugins` or `-p tests.fixtures_s3`).

`s3_server` (session scope) starts `ThreadedMotoServer` on 127.0.0.1 at a free port, with fake
credentials in the environment (restored at the end), and yields its endpoint URL.
`s3_settings` gives a `Settings` pointing at it; `s3_bucket` creates a fresh bucket per test.

`FaultProxy` sits between boto3 and moto. For a set fraction of requests (decided by a seeded
RNG, so a run's sequence of decisions is reproducible) it answers 500 InternalError, 503
ServiceUnavailable or 503 SlowDown, or drops the connection before or after forwarding; every
other request is forwarded byte for byte and its reply relayed byte for byte.
"""

from __future__ import annotations

import random
import socket
import socketserver
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import BinaryIO

import pytest

from infra.settings import Settings

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Anything from the developer's own AWS setup that would steer boto3 elsewhere.
CLEARED_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
               "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_CA_BUNDLE")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    aws_dir = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_ENV.items():
            mp.setenv(name, value)
        for name in CLEARED_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))  # absent files: no profile applies
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
        # Port 0: the kernel picks a free port, read back once the server is bound (no race).
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_settings(s3_server: str, tmp_path) -> Settings:
    return Settings(s3={"endpoint_url": s3_server, "addressing_style": "path"}, work_dir=str(tmp_path / "work"))


@pytest.fixture
def s3_client(s3_settings: Settings):
    from infra.storage.s3_client import make_s3_client

    return make_s3_client(s3_settings.s3)


@pytest.fixture
def s3_bucket(s3_client) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------- fault proxy

FAULT_KINDS = ("500", "503", "slowdown", "drop", "drop_after")
STALL_S = 60.0
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Service Unavailable", "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 that injects S3 faults into a fraction of requests.

    kinds: which faults to draw from — "500", "503", "slowdown" (S3 error replies, the request
    never reaches the server), "drop" (close without forwarding), "drop_after" (forward, then
    close without replying: the server acted, the client never learns it), "truncate" (forward,
    relay the head and half the body, close), "stall" (take the request, never answer: the client's
    read timeout must end it).
    only: if given, faults are drawn only for requests where only(method, target) is true,
    e.g. `lambda m, t: m == "POST" and "uploadId=" in t` for CompleteMultipartUpload.
    """

    def __init__(self, upstream: str, fault_rate: float, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS,
                 only: Callable[[str, str], bool] | None = None):
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port))
        self.fault_rate = fault_rate
        self.kinds = kinds
        self.only = only
        self.faults: Counter[str] = Counter()
        self.forwarded = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def injected(self) -> int:
        return sum(self.faults.values())

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = STALL_S  # no connection, stalled or idle, holds a thread for longer

            def handle(self) -> None:
                try:
                    proxy._serve_connection(self.rfile, self.wfile)
                except OSError:
                    pass  # the client or the upstream went away: the connection just ends

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        server.daemon_threads = True
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)  # type: ignore[union-attr]
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _draw(self, method: str, target: str) -> str | None:
        with self._lock:
            if (self.only is not None and not self.only(method, target)) or self._rng.random() >= self.fault_rate:
                self.forwarded += 1
                return None
            kind = self._rng.choice(self.kinds)
            self.faults[kind] += 1
            return kind

    def _serve_connection(self, rfile: BinaryIO, wfile: BinaryIO) -> None:
        """One client connection: requests in turn (keep-alive) until it closes or we drop it."""
        while True:
            head = _read_head(rfile)
            if head is None:
                return
            method, target, headers = _parse_head(head)
            if headers.get("expect", "").lower() == "100-continue":
                wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the upstream's own 100 is skipped
                wfile.flush()
            request = head + _read_body(rfile, headers)
            kind = self._draw(method, target)
            if kind == "drop":
                return
            if kind == "stall":
                rfile.read(1)  # until the client gives up and closes, or the socket timeout
                return
            if kind in _ERRORS:
                wfile.write(_error_reply(*_ERRORS[kind], head_request=method == "HEAD"))
                wfile.flush()
                continue
            reply, close = _forward(self.upstream, request, method)
            if kind == "drop_after":
                return
            if kind == "truncate":
                wfile.write(_truncated(reply))
                wfile.flush()
                return
            wfile.write(reply)
            wfile.flush()
            if close:
                return


def _read_head(f: BinaryIO) -> bytes | None:
    """Request line and headers, byte for byte; None when the peer closed between requests."""
    lines = []
    while True:
        line = f.readline(65537)
        if not line:
            return None if not lines else b"".join(lines)
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, target, lower-cased headers) of a request; for a reply, (version, status, headers)."""
    first, *rest = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in rest:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    method, _, target = first.partition(" ")
    return method, target.rsplit(" ", 1)[0], headers


def _read_body(f: BinaryIO, headers: dict[str, str]) -> bytes:
    """The message body exactly as sent: Content-Length bytes, or chunks with their framing."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = []
        while True:
            size_line = f.readline()
            out.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := f.readline()) not in (b"\r\n", b"\n", b""):
                    out.append(trailer)
                out.append(trailer)
                return b"".join(out)
            out.append(f.read(size + 2))
    length = int(headers.get("content-length", "0") or 0)
    return f.read(length) if length else b""


def _forward(upstream: tuple[str, int], request: bytes, method: str) -> tuple[bytes, bool]:
    """Send one request on a fresh upstream connection; return the final reply's bytes (1xx
    interim replies skipped) and whether the client connection must close after it."""
    with socket.create_connection(upstream, timeout=60) as sock, sock.makefile("rb") as f:
        sock.sendall(request)
        while True:
            head = _read_head(f) or b""
            status_line = head.split(b"\r\n", 1)[0].split()
            status = int(status_line[1]) if len(status_line) > 1 else 502
            if not 100 <= status < 200:
                break
        _, _, headers = _parse_head(head)
        close = headers.get("connection", "").lower() == "close"
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" in headers:
            body = _read_body(f, headers)
        else:
            body, close = f.read(), True  # delimited by the server closing
        return head + body, close


def _truncated(reply: bytes) -> bytes:
    head, sep, body = reply.partition(b"\r\n\r\n")
    return head + sep + body[: len(body) // 2]


def _error_reply(status: int, reason: str, code: str, message: str, *, head_request: bool) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>fault-{uuid.uuid4().hex[:16]}</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nx-amz-request-id: fault\r\n\r\n"
    ).encode()
    return head if head_request else head + body  # a reply to HEAD never has a body
