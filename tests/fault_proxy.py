"""A small fault-injecting HTTP proxy for tests: forwards to a real server, injects failures on a schedule.

    with FaultProxy("http://127.0.0.1:8000", per_item([["429"], ["500", "drop"], []])) as proxy:
        gen = OpenAIGenerator(model, base_url=proxy.url + "/v1", ...)
        ...
        proxy.requests          # every request the proxy received (faulted or forwarded)
        proxy.counts            # {"ok": 7, "429": 1, ...}

A *schedule* decides what happens to each request: ``schedule(request_no, item_no, attempt_no) -> action``
(all 0-based). ``item_no`` numbers the distinct request bodies in the order they were first seen (for
``/v1/completions`` the body is mostly the prompt, so an item is one prompt) and ``attempt_no`` counts the
requests seen with that body, so a per-item plan is deterministic whatever the concurrency.

Actions:

- ``"ok"``: forward to the upstream server and relay its reply;
- ``"429"``: HTTP 429 without Retry-After; ``"429:N"``: with ``Retry-After: N``;
- ``"500"``, ``"502"``, ``"503"``, ... : that HTTP status, a small JSON error body;
- ``"drop"``: read the request, then close the connection without a byte of reply;
- ``"slow"``: wait ``slow_seconds`` (set it past the client's timeout), then close without a reply;
  ``"slow-ok"``: wait, then forward (a reply that arrives too late).

Threaded (``ThreadingHTTPServer``, daemon threads), 127.0.0.1 only, every reply ``Connection: close`` (one
request per connection, so a dropped connection never hides inside a kept-alive one). ``stop()`` wakes the
slow handlers so shutdown is quick.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Schedule = Callable[[int, int, int], str]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length", "host"}


def always(action: str = "ok") -> Schedule:
    """Every request gets ``action``."""
    return lambda request_no, item_no, attempt_no: action


def cycle(actions: Sequence[str]) -> Schedule:
    """Request n gets ``actions[n % len(actions)]`` (by arrival order, whatever the item)."""
    actions = list(actions)
    return lambda request_no, item_no, attempt_no: actions[request_no % len(actions)]


def per_item(plans: Sequence[Sequence[str]], then: str = "ok") -> Schedule:
    """Item i's attempt a gets ``plans[i % len(plans)][a]``, and ``then`` once its plan is used up."""
    plans = [list(p) for p in plans]

    def schedule(request_no: int, item_no: int, attempt_no: int) -> str:
        plan = plans[item_no % len(plans)]
        return plan[attempt_no] if attempt_no < len(plan) else then

    return schedule


@dataclass
class Request:
    no: int
    item: int
    attempt: int
    method: str
    path: str
    action: str
    started: float
    status: int | None = None  # what the client got (None: connection closed without a reply)
    seconds: float = 0.0


class FaultProxy:
    """See the module docstring. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, upstream: str, schedule: Schedule | None = None, *, slow_seconds: float = 5.0,
                 upstream_timeout: float = 300.0, host: str = "127.0.0.1", port: int = 0):
        u = urlsplit(upstream if "://" in upstream else f"http://{upstream}")
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be an http://host:port URL, got {upstream!r}")
        self.upstream_host = u.hostname
        self.upstream_port = u.port or 80
        self.schedule = schedule or always("ok")
        self.slow_seconds = float(slow_seconds)
        self.upstream_timeout = float(upstream_timeout)
        self.requests: list[Request] = []
        self._items: dict[str, int] = {}
        self._attempts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(r.action for r in self.requests)

    def attempts_per_item(self) -> dict[int, int]:
        with self._lock:
            return dict(Counter(r.item for r in self.requests))

    def reset(self, schedule: Schedule | None = None) -> None:
        """Forget the counts and items (and optionally switch the schedule)."""
        with self._lock:
            self.requests.clear()
            self._items.clear()
            self._attempts.clear()
            if schedule is not None:
                self.schedule = schedule

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes the slow handlers
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------
    def _register(self, method: str, path: str, body: bytes) -> Request:
        key = path + "\n" + _item_key(body)
        with self._lock:
            item = self._items.setdefault(key, len(self._items))
            attempt = self._attempts[key]
            self._attempts[key] += 1
            no = len(self.requests)
            action = self.schedule(no, item, attempt)
            req = Request(no=no, item=item, attempt=attempt, method=method, path=path, action=action,
                          started=time.monotonic())
            self.requests.append(req)
            return req

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP], data
        finally:
            conn.close()

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = proxy._register(self.command, self.path, body)
                try:
                    self._act(req, body)
                finally:
                    req.seconds = time.monotonic() - req.started

            def _act(self, req: Request, body: bytes) -> None:
                action = req.action
                if action in ("slow", "slow-ok"):
                    proxy._stopping.wait(proxy.slow_seconds)
                    if action == "slow":
                        self._drop()
                        return
                    action = "ok"
                if action == "drop":
                    self._drop()
                    return
                if action == "ok":
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    try:
                        status, resp_headers, data = proxy._forward(self.command, self.path, headers, body)
                    except OSError as e:  # upstream down: say so, like a real gateway would
                        status, resp_headers = 502, [("Content-Type", "application/json")]
                        data = json.dumps({"error": {"message": f"fault proxy: upstream failed: {e}",
                                                     "code": 502}}).encode()
                    self._reply(req, status, resp_headers, data)
                    return
                code, _, retry_after = action.partition(":")
                if not code.isdigit():
                    raise ValueError(f"fault proxy: unknown action {req.action!r}")
                headers = [("Content-Type", "application/json")]
                if retry_after:
                    headers.append(("Retry-After", retry_after))
                data = json.dumps({"error": {"message": f"fault proxy: injected HTTP {code}",
                                             "type": "injected", "code": int(code)}}).encode()
                self._reply(req, int(code), headers, data)

            def _reply(self, req: Request, status: int, headers: list, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                    req.status = status
                except OSError:  # the client gave up (its timeout) before the reply: nothing to do
                    pass
                self.close_connection = True

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        return Handler


def _item_key(body: bytes) -> str:
    """What makes two requests 'the same item': the prompt (or messages) of a JSON body, else the bytes."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        for field in ("prompt", "messages", "input"):
            if field in data:
                return hashlib.sha256(json.dumps(data[field], sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(body).hexdigest()
