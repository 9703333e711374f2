"""A NeMo-compatible `/generate` server: the 24.05 contract, quirks included.

It stands in for `megatron_gpt_eval.py server=True` (NeMo's text_generation_server.py on
Flask/flask_restful/Werkzeug) so the orchestrator can be tested against real processes:

- Routing as NeMo's Flask app routes (checked against NeMo's own code: tests/nemo_reference.py).
  `/generate` is a flask_restful resource with only `put()`; `Flask(__name__, static_url_path='')`
  also registers a static route `/<path:filename>` (GET/HEAD/OPTIONS) over a folder that does
  not exist. So: GET/HEAD on any path -> Flask's HTML 404 (no such static file); other methods
  on `/generate` -> 405 with flask_restful's JSON body (NeMo answers that or Werkzeug's HTML 405,
  depending on the set order of the allowed methods, i.e. on PYTHONHASHSEED); on any other
  non-empty path -> Werkzeug's HTML 405 (the static route has the path, not the method); on
  `/` -> HTML 404.
- Validation runs in TGS `put()` order with its exact messages. A failure is HTTP 200 whose
  body is a JSON *string*; more than 128 sentences -> 400 (JSON string); a missing
  `sentences`, a body that is not an object, or any exception in generation -> 500
  `{"message": "Internal Server Error"}`. A body that is not JSON -> 400 and a Content-Type
  that is not JSON -> 415 (newer Werkzeug). Unknown keys are only logged.
- Every reply closes the connection (`Connection: close`), as Werkzeug's development server
  has done since 2.1: no keep-alive.
- One generation at a time behind a FIFO lock: later requests wait, sockets open, in
  arrival order. Validation happens before the lock, as in TGS.
- The socket is bound only after the engine has loaded, so the port refuses connections
  until then; then ` * Running on http://HOST:PORT` goes to stderr (Werkzeug's banner).
- Under Slurm only rank 0 serves; other ranks idle until SIGTERM/SIGINT (NeMo's non-zero
  ranks wait in a broadcast). SIGTERM/SIGINT -> clean shutdown, exit 0.

Fault switches (for the fault suite) and a stats file (for benchmarks) are in `FaultPlan`
and `ServeConfig`. The same port also serves OpenAI's `/v1/completions`, `/v1/models` and `/health`
(openai_api.py) unless `ServeConfig.openai` is off: then only NeMo's routes, exactly as above.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socketserver
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from infra.local_server.engines import Engine, GenerateParams, build_reply
from infra.local_server.nemo_validation import Rejection, validate_request
from infra.local_server.openai_api import CompletionsService, serve_openai

log = logging.getLogger(__name__)

GENERATE_PATH = "/generate"

# Bodies exactly as Flask / flask_restful / Werkzeug write them.
NOT_FOUND_HTML = (
    "<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n"
    "<p>The requested URL was not found on the server. If you entered the URL manually please "
    "check your spelling and try again.</p>\n"
)
METHOD_NOT_ALLOWED_HTML = (
    "<!doctype html>\n<html lang=en>\n<title>405 Method Not Allowed</title>\n<h1>Method Not Allowed</h1>\n"
    "<p>The method is not allowed for the requested URL.</p>\n"
)
# The methods each route answers (Flask adds OPTIONS, and HEAD where there is GET).
GENERATE_ALLOW = "GET, HEAD, OPTIONS, PUT"  # the resource's PUT plus the static route's methods
STATIC_ALLOW = "GET, HEAD, OPTIONS"
METHOD_NOT_ALLOWED = {"message": "The method is not allowed for the requested URL."}
INTERNAL_ERROR = {"message": "Internal Server Error"}
BAD_JSON = {"message": "The browser (or proxy) sent a request that this server could not understand."}
NOT_JSON_TYPE = {
    "message": "Did not attempt to load JSON data because the request Content-Type was not 'application/json'."
}

FAULT_REJECT_MESSAGE = "request rejected by --fault-reject-on (fault injection)"




# --------------------------------------------------------------------------- generation service


@dataclass(frozen=True)
class FaultPlan:
    """Failures to inject. Request numbers count every PUT /generate on arrival, from 1."""

    crash_after: int | None = None  # request crash_after+1 kills the process (os._exit(1))
    hang_after: int | None = None  # request hang_after+1 takes the lock and never answers
    fail_on: str | None = None  # a prompt containing this -> 500, as an exception in generation
    reject_on: str | None = None  # a prompt containing this -> 200 + JSON string
    throttle_every: int | None = None  # every N-th request -> 503, the next such one 429, ... (OpenAI side only)
    # With a marker, the crash and hang faults fire once across restarts: the first to fire
    # creates the file, and a server started while it exists injects neither.
    once_marker: Path | None = None

    def armed(self) -> "FaultPlan":
        if self.once_marker is not None and self.once_marker.exists():
            return FaultPlan(fail_on=self.fail_on, reject_on=self.reject_on, throttle_every=self.throttle_every)
        return self

    def fired(self, what: str) -> None:
        if self.once_marker is not None:
            self.once_marker.write_text(f"{what} at {time.time()}\n")


class InjectedFailure(RuntimeError):
    """Raised inside generation by --fault-500-on."""


class FifoLock:
    """A lock granted in arrival order (a ticket lock), so queued requests are served FIFO."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._serving = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._cond:
            ticket = next(self._tickets)
            self._cond.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


class GenerateService:
    """PUT /generate without HTTP: validation, the lock, faults, stats."""

    def __init__(
        self,
        engine: Engine,
        *,
        faults: FaultPlan = FaultPlan(),
        extra_latency_s: float = 0.0,
        stats_file: Path | None = None,
    ):
        self.engine = engine
        self.faults = faults
        self.extra_latency_s = extra_latency_s
        self.stats_file = stats_file
        self._lock = FifoLock()
        self._arrivals = itertools.count(1)
        self._never = threading.Event()

    def arrive(self) -> int:
        """Count a request as it arrives; the crash fault fires here, before any work."""
        number = next(self._arrivals)
        crash_after = self.faults.crash_after
        if crash_after is not None and number > crash_after:
            log.error("fault injection: crashing on request %d (--fault-crash-after %d)", number, crash_after)
            self.faults.fired("crash")
            os._exit(1)  # no cleanup, no reply: as abrupt as a killed rank
        return number

    def handle(self, number: int, body: object) -> tuple[int, object]:
        """Return (status, JSON payload). Exceptions mean 500, as flask_restful makes them."""
        outcome = validate_request(body)  # type: ignore[arg-type]  # a non-dict raises -> 500
        if isinstance(outcome, Rejection):
            log.info("request %d rejected (%d): %s", number, outcome.status, outcome.message)
            return outcome.status, outcome.message
        sentences, params = outcome
        if self.faults.reject_on is not None and _mentions(sentences, self.faults.reject_on):
            return 200, FAULT_REJECT_MESSAGE
        with self._lock.held():
            return 200, self._generate(number, sentences, params)

    def _generate(self, number: int, sentences: list, params: GenerateParams) -> dict:
        hang_after = self.faults.hang_after
        if hang_after is not None and number > hang_after:
            log.error("fault injection: request %d holds the lock forever (--fault-hang-after %d)", number, hang_after)
            self.faults.fired("hang")
            self._never.wait()
        started = time.time()
        if self.extra_latency_s:
            time.sleep(self.extra_latency_s)
        if self.faults.fail_on is not None and _mentions(sentences, self.faults.fail_on):
            raise InjectedFailure(f"--fault-500-on {self.faults.fail_on!r} matched request {number}")
        if params.all_probs and not params.compute_logprob:
            # NeMo fills full_logprob only inside the compute_logprob branch and fails without it.
            raise ValueError("all_probs needs compute_logprob")
        generation = self.engine.generate(sentences, params)
        reply = build_reply(self.engine, generation, params)
        self._record(started, time.time(), generation)
        log.info("request %d: %d sentences, %d tokens generated", number, len(sentences), sum(generation.generated_lengths))
        return reply

    def _record(self, started: float, ended: float, generation) -> None:
        if self.stats_file is None:
            return
        line = {
            "start": started,
            "end": ended,
            "batch": len(generation.rows),
            "prompt_tokens": sum(generation.prompt_lengths),
            "generated_tokens": sum(generation.generated_lengths),
        }
        # Called under the generation lock, so lines never interleave.
        with open(self.stats_file, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


def _mentions(sentences: list, needle: str) -> bool:
    return any(isinstance(s, str) and needle in s for s in sentences)


# --------------------------------------------------------------------------- HTTP


def _flask_jsonify(obj: object) -> bytes:
    # Flask's jsonify outside debug mode: compact, sorted keys, trailing newline.
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _restful_json(obj: object) -> bytes:
    # flask_restful's output_json for returned strings and error bodies.
    return (json.dumps(obj) + "\n").encode()


def _is_json_type(content_type: str | None) -> bool:
    mimetype = (content_type or "").split(";", 1)[0].strip().lower()
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


class GenerateHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # as Werkzeug's threaded server, which closes every connection
    # Headers and body go out in two send() calls: without TCP_NODELAY, Nagle's algorithm holds
    # the body until the client's delayed ACK (~40 ms a reply), a stall no real server has.
    disable_nagle_algorithm = True
    server_version = "nemotron-sdg-local/0.1"
    server: "LocalHTTPServer"

    def parse_request(self) -> bool:
        # Reset per-request state (a handler object could serve several requests).
        self._body_read = False
        return super().parse_request()

    def do_PUT(self) -> None:
        if not self._on_generate():
            return self._no_route()
        service = self.server.service
        number = service.arrive()
        body = self._read_body()
        if not _is_json_type(self.headers.get("Content-Type")):
            return self._send(415, _restful_json(NOT_JSON_TYPE))
        try:
            payload = json.loads(body)
        except ValueError:
            return self._send(400, _restful_json(BAD_JSON))
        try:
            status, result = service.handle(number, payload)
        except Exception:
            log.exception("request %d failed; answering 500 as flask_restful does", number)
            return self._send(500, _restful_json(INTERNAL_ERROR))
        encode = _flask_jsonify if isinstance(result, dict) else _restful_json
        self._send(status, encode(result))

    def do_GET(self) -> None:
        if serve_openai(self, self.command):
            return
        # Every path goes to the static route, whose folder does not exist.
        self._read_body()
        self._not_found()

    do_HEAD = do_GET

    def do_OPTIONS(self) -> None:
        self._read_body()
        if self._route() == "/":
            return self._not_found()
        allow = GENERATE_ALLOW if self._on_generate() else STATIC_ALLOW
        self._send(200, b"", content_type="text/html; charset=utf-8", allow=allow)

    def _method_not_allowed(self) -> None:
        self._read_body()
        if not self._on_generate():
            return self._no_route()
        self._send(405, _restful_json(METHOD_NOT_ALLOWED), allow=GENERATE_ALLOW)

    def do_POST(self) -> None:
        if not serve_openai(self, "POST"):
            self._method_not_allowed()

    do_DELETE = do_PATCH = _method_not_allowed

    def _route(self) -> str:
        return urllib.parse.unquote(self.path.split("?", 1)[0])

    def _on_generate(self) -> bool:
        return self._route() == GENERATE_PATH

    def _no_route(self) -> None:
        """A method other than GET/HEAD/OPTIONS on a path that is not `/generate`."""
        self._read_body()  # closing on an unread body would reset the connection under the reply
        if self._route() == "/":
            return self._not_found()
        self._send(405, METHOD_NOT_ALLOWED_HTML.encode(), content_type="text/html; charset=utf-8", allow=STATIC_ALLOW)

    def _not_found(self) -> None:
        self._read_body()
        self._send(404, NOT_FOUND_HTML.encode(), content_type="text/html; charset=utf-8")

    def _read_body(self) -> bytes:
        if getattr(self, "_body_read", False):
            return b""
        self._body_read = True
        length = self.headers.get("Content-Length")
        if length is None:
            # Chunked or unframed bodies are not supported; closing keeps the stream in sync.
            self.close_connection = True
            return b""
        return self.rfile.read(int(length))

    def _send(self, status: int, body: bytes, *, content_type: str = "application/json", allow: str | None = None,
              keep_alive: bool = False) -> None:
        self.close_connection = not keep_alive  # Werkzeug >= 2.1 closes after every reply; uvicorn does not
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if allow:
                self.send_header("Allow", allow)
            if not keep_alive:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away before the reply was sent")
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s - %s", self.address_string(), format % args)


class LocalHTTPServer(ThreadingHTTPServer):
    """One thread per connection (Werkzeug's `threaded=True`)."""

    daemon_threads = True  # a hung request must not keep the process alive at shutdown
    block_on_close = False  # ...nor server_close() wait for it (socketserver joins even daemon threads)
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: GenerateService, completions: CompletionsService | None = None):
        self.service = service
        self.completions = completions
        super().__init__(address, GenerateHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


# --------------------------------------------------------------------------- process lifecycle


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 1424
    port_file: Path | None = None
    stats_file: Path | None = None
    load_delay_s: float = 0.0
    extra_latency_s: float = 0.0
    faults: FaultPlan = field(default_factory=FaultPlan)
    openai: bool = True  # also serve /v1/completions, /v1/models, /health
    served_model: str = "nemotron-4-340b-base"
    model_root: str | None = None  # what is loaded (/v1/models `root`): the model directory, or "simulated"
    max_model_len: int = 4096
    openai_error_shape: str = "nested"
    sim_slots: int = 256


class _Interrupted(BaseException):
    """SIGTERM/SIGINT while loading: unwinds the load, then the process exits 0."""


class _StopSignal:
    """SIGTERM/SIGINT set a flag; while `interruptible`, they also abort what is running.

    The handler touches no lock: it runs in the main thread, which may itself hold the very
    lock an Event would need at that moment. The main thread polls the flag instead.
    """

    POLL_S = 0.1

    def __init__(self) -> None:
        self.requested = False
        self._interrupt = False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True
        if self._interrupt:
            raise _Interrupted()

    def wait(self) -> None:
        while not self.requested:
            time.sleep(self.POLL_S)
        log.info("stop requested (SIGTERM/SIGINT); shutting down")

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self._interrupt = True
        try:
            if self.requested:
                raise _Interrupted()
            yield
        finally:
            self._interrupt = False


def serve(config: ServeConfig, load_engine: Callable[[], Engine], *, rank: str | None = None) -> int:
    """Run the server until SIGTERM/SIGINT. Returns the process exit code."""
    stop = _StopSignal()
    if rank not in (None, "", "0"):
        log.info("rank %s does not serve HTTP (only rank 0 does); idling until SIGTERM", rank)
        stop.wait()
        return 0
    try:
        with stop.interruptible():
            engine = _load(config, load_engine, stop)
    except _Interrupted:
        log.info("stopped before the engine had loaded")
        return 0
    except Exception as exc:
        log.error("could not load the engine: %s", exc, exc_info=not isinstance(exc, ValueError))
        return 1
    service = GenerateService(
        engine, faults=config.faults, extra_latency_s=config.extra_latency_s, stats_file=config.stats_file
    )
    completions = CompletionsService(engine, served_model=config.served_model, max_model_len=config.max_model_len,
                                     error_shape=config.openai_error_shape, slots=config.sim_slots,
                                     lock=service._lock, model_root=config.model_root) if config.openai else None
    try:
        httpd = LocalHTTPServer((config.host, config.port), service, completions)
    except OSError as exc:
        log.error("could not listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    return _run_until_stopped(httpd, config, stop)


def _load(config: ServeConfig, load_engine: Callable[[], Engine], stop: _StopSignal) -> Engine:
    if config.load_delay_s:
        log.info("simulating model load: %.1f s before binding", config.load_delay_s)
        time.sleep(config.load_delay_s)  # a signal raises _Interrupted out of the sleep
    started = time.monotonic()
    engine = load_engine()
    log.info("engine %s ready after %.1f s", engine.name, time.monotonic() - started)
    return engine


def _run_until_stopped(httpd: LocalHTTPServer, config: ServeConfig, stop: _StopSignal) -> int:
    host, port = httpd.server_address[:2]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    thread.start()
    if config.port_file is not None:
        write_atomically(config.port_file, f"{port}\n")
    if host in ("0.0.0.0", ""):
        print(" * Running on all addresses (0.0.0.0)", file=sys.stderr, flush=True)
    print(f" * Running on http://{host}:{port}", file=sys.stderr, flush=True)
    stop.wait()
    httpd.shutdown()
    httpd.server_close()
    log.info("server on port %d stopped", port)
    return 0


def write_atomically(path: Path, text: str) -> None:
    """Readers see either no file or the whole text (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
