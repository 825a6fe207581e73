"""A fault-injecting HTTP proxy in front of an S3 endpoint, on 127.0.0.1.

Object stores throttle (503 SlowDown), fail (500 InternalError) and slow down under load; a
job on a real cluster must ride that out with retries, and fail in one clear line when the
store stays unreachable. moto never does any of that, so this proxy does it on purpose:

    proxy = FaultyS3Proxy("http://127.0.0.1:5000").start()
    proxy.inject(error_rate=0.3, delay_rate=0.2, duration=20)   # 30% errors, 20% delayed, 20 s
    ... point jobs at proxy.endpoint ...
    proxy.snapshot()  # what was injected: a test asserts the faults really happened

`hold(pattern)` keeps object GETs whose key matches waiting until `release()`: a test holds
back part of a job's input, so a fault it triggers by what the job has written lands while
that part is still to do, however fast the machine (a held GET from a process that died
meanwhile is forwarded on release into a closed socket, harmlessly).

`fail_first={"PUT": 1}` makes sure a path is hit: the first request(s) of that method in the
window fail whatever the dice say, and the window stays open (at most `max_duration` s) until
they have. A job writes only a few files and its first write may come late on a loaded
machine: left to chance, the write path would go untested in a third of the runs.

Requests are forwarded unchanged: headers (Host included) and body bytes, so signatures and
aws-chunked uploads pass through; a body sent with chunked transfer framing is re-sent with
a Content-Length, its bytes untouched. The proxy only decides, per request, whether to
answer with an S3-style error instead, or to wait before forwarding.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FaultyS3Proxy", "FaultStats"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "proxy-authenticate", "proxy-authorization"}

_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class FaultStats:
    requests: int = 0
    failed: int = 0
    delayed: int = 0
    forwarded: int = 0
    failed_methods: dict | None = None  # method → count of injected errors


@dataclass
class _Plan:
    error_rate: float = 0.0
    delay_rate: float = 0.0
    delay_s: tuple[float, float] = (0.2, 1.0)
    statuses: tuple[int, ...] = (503, 500)
    until: float = float("inf")  # time.monotonic() after which everything passes...
    fail_first: dict | None = None  # ...once these methods' first requests were failed,
    hard_until: float = float("inf")  # ...or at this time at the latest


class FaultyS3Proxy:
    def __init__(self, upstream: str, seed: int = 0) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._plan = _Plan(until=0.0)
        self.stats = FaultStats(failed_methods={})
        self._hold: re.Pattern | None = None
        self._gate = threading.Event()
        self._gate.set()
        self._hold_deadline = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control -----------------------------------------------------------------------------
    def inject(self, error_rate: float = 0.3, delay_rate: float = 0.0,
               delay_s: tuple[float, float] = (0.2, 1.0), statuses: tuple[int, ...] = (503, 500),
               duration: float | None = None, fail_first: dict | None = None,
               max_duration: float | None = None) -> None:
        """From now on, fail `error_rate` of the requests with one of `statuses` and delay
        `delay_rate` of the others by `delay_s` seconds; for `duration` s, or until `heal()`.
        With `fail_first` ({method: n}), the first n requests of each such method fail too,
        and the window stays open until they have (at most `max_duration` s)."""
        now = time.monotonic()
        with self._lock:
            until = float("inf") if duration is None else now + duration
            hard = float("inf") if max_duration is None else now + max_duration
            self.stats.failed_methods = {}
            self._plan = _Plan(error_rate, delay_rate, delay_s, tuple(statuses), until,
                               dict(fail_first or {}), hard)

    def refuse_all(self) -> None:
        """Every request answered 503 SlowDown until `heal()`: storage that stays unusable."""
        self.inject(error_rate=1.0, statuses=(503,))

    def hold(self, key_pattern: str, max_hold: float = 300.0) -> None:
        """Object GETs whose path matches `key_pattern` (a regex searched in the unquoted
        path, query excluded: listings are never held) wait until `release()`, and at most
        `max_hold` s: a test whose premise is wrong then fails on its assertions, not by
        hanging the tier."""
        with self._lock:
            self._hold = re.compile(key_pattern)
            self._hold_deadline = time.monotonic() + max_hold
            self._gate.clear()

    def release(self) -> None:
        with self._lock:
            self._hold = None
            self._gate.set()

    def _wait_at_gate(self, method: str, path: str) -> None:
        with self._lock:
            pattern, deadline = self._hold, self._hold_deadline
        if (method == "GET" and pattern is not None
                and pattern.search(urllib.parse.unquote(urllib.parse.urlsplit(path).path))):
            self._gate.wait(max(0.0, deadline - time.monotonic()))

    def heal(self) -> None:
        with self._lock:
            self._plan = _Plan(until=0.0)

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.stats.requests, "failed": self.stats.failed,
                    "delayed": self.stats.delayed, "forwarded": self.stats.forwarded,
                    "failed_methods": dict(self.stats.failed_methods or {})}

    def _active(self, plan: _Plan) -> bool:  # with the lock held
        now = time.monotonic()
        if now >= plan.hard_until:
            return False
        if now < plan.until:
            return True
        return bool(self._owed(plan))

    def _owed(self, plan: _Plan) -> set[str]:
        """Methods whose first requests still have to fail (with the lock held)."""
        done = self.stats.failed_methods or {}
        return {m for m, n in (plan.fail_first or {}).items() if done.get(m, 0) < n}

    def _decide(self, method: str) -> tuple[int | None, float]:
        """(status to fail with or None, seconds to wait first) for one request."""
        with self._lock:
            self.stats.requests += 1
            plan = self._plan
            if not self._active(plan):
                return None, 0.0
            if method in self._owed(plan) or self._rng.random() < plan.error_rate:
                self.stats.failed += 1
                self.stats.failed_methods[method] = self.stats.failed_methods.get(method, 0) + 1
                return self._rng.choice(plan.statuses), 0.0
            if self._rng.random() < plan.delay_rate:
                self.stats.delayed += 1
                return None, self._rng.uniform(*plan.delay_s)
            return None, 0.0

    # -- server ------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultyS3Proxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:  # quiet: pytest shows stderr on failures
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()  # CRLF after each chunk
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                body = self._body()  # always consume it, also when answering with an error
                proxy._wait_at_gate(self.command, self.path)
                status, delay = proxy._decide(self.command)
                if status is not None:
                    code, message = _ERRORS.get(status, ("InternalError", "injected"))
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                           f"<Message>{message}</Message><RequestId>faulty-s3</RequestId></Error>"
                           ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if delay:
                    time.sleep(delay)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.stats.forwarded += 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3",
                                        daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "FaultyS3Proxy":
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.release()  # no handler thread left waiting at the gate
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
