"""The HTTP side of the NeMo-compatible server: NeMo 24.05's `/generate` routes, quirks included.

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
- Validation runs in TGS `put()` order with its exact messages (service.py, nemo_validation.py).
  A failure is HTTP 200 whose body is a JSON *string*; more than 128 sentences -> 400 (JSON
  string); a missing `sentences`, a body that is not an object, or any exception in generation
  -> 500 `{"message": "Internal Server Error"}`. A body that is not JSON -> 400 and a Content-Type
  that is not JSON -> 415 (newer Werkzeug). Unknown keys are only logged.
- Every reply closes the connection (`Connection: close`), as Werkzeug's development server
  has done since 2.1: no keep-alive.

The same port also serves OpenAI's `/v1/completions`, `/v1/models` and `/health` (openai_api.py)
when the server has a `CompletionsService`: without one, only NeMo's routes, exactly as above.
"""

from __future__ import annotations

import json
import logging
import socketserver
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from infra.local_server.openai_api import CompletionsService, serve_openai
from infra.local_server.service import GenerateService

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
