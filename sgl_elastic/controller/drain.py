"""A bounded, graceful drain on SIGTERM (main process).

SGLang 0.5.23 marks its tokenizer manager ``gracefully_exit`` on SIGTERM, waits without a bound
for the requests in flight, then stops the schedulers; it keeps admitting new requests meanwhile.
Here, once it is set:
- new generation requests (``/generate``, ``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/responses``) get a 503 ``{"error": ...}`` at once (``Admission``, a plain ASGI middleware);
- the requests in flight finish normally for up to ``--elastic-drain-timeout`` seconds; whatever is
  left then is aborted through SGLang's own abort path, so each of those clients gets an explicit
  error; SGLang then stops the schedulers and the launcher stops the daemon and removes what the
  processes left in ``/dev/shm``;
- the failover controller treats the ranks' exits as the shutdown they are, not as failures.
"""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["Admission", "DrainGuard", "draining", "stopping"]

_GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses"})


def _tokenizer_manager():
    try:
        from sglang.srt.entrypoints.http_server import _global_state
    except ImportError:
        return None
    return getattr(_global_state, "tokenizer_manager", None)


def draining() -> bool:
    """Whether the server has been told to shut down (SIGTERM) and is draining."""
    return bool(getattr(_tokenizer_manager(), "gracefully_exit", False))


def stopping() -> bool:
    """Whether the server is shutting down: draining (SIGTERM), or its HTTP server was told to exit
    (Ctrl-C: uvicorn's handler, installed for SIGINT, has set ``should_exit`` on its server)."""
    if draining():
        return True
    import signal

    try:
        server = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    except (ValueError, TypeError):
        return False
    return bool(getattr(server, "should_exit", False))


def _log(msg: str) -> None:
    print(f"[sgl-elastic drain] {msg}", file=sys.stderr, flush=True)


class Admission:
    """ASGI middleware: while draining, a new generation request gets a 503 and is not admitted."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("method") == "POST" and scope.get("path") in _GENERATION_PATHS \
                and draining():
            from fastapi.responses import JSONResponse

            resp = JSONResponse({"error": "the server is shutting down (SIGTERM): not admitting new requests;"
                                          " send it to another replica"}, status_code=503,
                                headers={"Retry-After": "1"})
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)


class DrainGuard:
    """Aborts what is still in flight ``timeout_s`` after the drain began (see module docstring)."""

    def __init__(self, timeout_s: float, poll_s: float = 0.2) -> None:
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.aborted: list[str] = []

    def start(self) -> "DrainGuard":
        threading.Thread(target=self._run, name="sgle-drain-guard", daemon=True).start()
        return self

    def _run(self) -> None:
        while not draining():
            time.sleep(self.poll_s)
        tm = _tokenizer_manager()
        n = len(tm.rid_to_state)
        _log(f"SIGTERM: not admitting new requests; {n} in flight may finish within {self.timeout_s:g} s")
        deadline = time.monotonic() + self.timeout_s
        while tm.rid_to_state and time.monotonic() < deadline:
            time.sleep(self.poll_s)
        left = list(tm.rid_to_state)
        if not left:
            _log("every request in flight finished")
            return
        _log(f"{len(left)} request(s) still running after {self.timeout_s:g} s: aborting them (each gets an error)")
        self.aborted = left
        loop = tm.event_loop
        for rid in left:
            if loop is not None:
                loop.call_soon_threadsafe(tm.abort_request, rid)
