"""The elastic admin API on SGLang's own HTTP server (main process): ``/elastic/*``.

- ``GET /elastic/status``: the failover controller's state, epoch, ranks, widths, recoveries;
- ``POST /elastic/inject_failure {"rank": r}``: a device loss: SIGKILL rank r's process (its
  daemon-held memory is dropped by the migration that follows);
- ``POST /elastic/add_rank``: scale-up by one rank (202: accepted; it runs as a recovery whose
  phases show in the status; 409 while a recovery runs or when no wider layout exists).
- ``POST /elastic/rebalance [{"algorithm": "ours" | "deepseek" | "elasticity_aware"}]``: place the
  experts by their measured loads now (202; ``controller.placers``: the baselines, for comparisons,
  need equal expert slots per rank, else 409; an unknown algorithm gets 400).

Probes (no token; what a load balancer or an orchestrator asks):
- ``GET /health`` (liveness): SGLang's own check while serving; **200 while a recovery runs**
  (requests are held, not failed: the server must not be taken out for a recovery that will
  finish), also when SGLang's one-token probe timed out because a recovery started meanwhile;
  503 once a recovery has given up (state ``failed`` and its fallback restart failed) or while
  the server drains for shutdown.
- ``GET /ready`` (readiness): 503 ``{"status": "recovering" | "failed"}`` while a recovery runs
  or after one gave up, else SGLang's answer.

Every admin call needs the admin token (``Authorization: Bearer <token>`` or ``X-Elastic-Token``):
``--elastic-admin-token``, or one generated at start and written to a 0600 file whose path is
logged. A missing or wrong token gets 401 (compared in constant time); a bad body gets 400/409
and changes nothing.
"""

# (no "from __future__ import annotations": FastAPI reads the handlers' annotations at route creation)

import hmac
import json
import os
import secrets
import signal
import sys
import tempfile

__all__ = ["AdminToken", "install_routes"]


def _tokenizer_manager():
    from sglang.srt.entrypoints.http_server import _global_state

    return getattr(_global_state, "tokenizer_manager", None)


def _draining() -> bool:
    tm = _tokenizer_manager()
    return bool(getattr(tm, "gracefully_exit", False))


def _mark_up() -> None:
    """Undo SGLang's UnHealthy mark left by a one-token probe that waited through a recovery."""
    from sglang.srt.managers.tokenizer_manager import ServerStatus

    tm = _tokenizer_manager()
    if tm is not None and tm.server_status == ServerStatus.UnHealthy:
        tm.server_status = ServerStatus.Up


class AdminToken:
    def __init__(self, token: "str | None") -> None:
        self.path = None
        if token is None:
            token = secrets.token_urlsafe(24)
            fd, self.path = tempfile.mkstemp(prefix="sgle-admin-token-")
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
            print(f"[sgl-elastic admin] token for /elastic/* written to {self.path} (0600)", file=sys.stderr,
                  flush=True)
        self._token = token.encode()

    def check(self, presented) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self._token)

    def remove_file(self) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _presented(request):
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-elastic-token")


def install_routes(app, token: AdminToken, controller) -> None:
    """Add the ``/elastic/*`` routes to SGLang's FastAPI ``app`` (before the server starts)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    def _deny():
        return JSONResponse({"error": "unauthorized: give the admin token (Authorization: Bearer <token>)"},
                            status_code=401)

    async def status(request: Request):
        if not token.check(_presented(request)):
            return _deny()
        return JSONResponse(controller.status())

    async def inject_failure(request: Request):
        if not token.check(_presented(request)):
            return _deny()
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - any unparsable body
            return JSONResponse({"error": 'body must be JSON: {"rank": <int>}'}, status_code=400)
        rank = body.get("rank") if isinstance(body, dict) else None
        if not isinstance(rank, int) or isinstance(rank, bool):
            return JSONResponse({"error": f'body must be {{"rank": <int>}}, got {body!r}'}, status_code=400)
        err, code, pid = controller.check_injectable(rank)
        if err:
            return JSONResponse({"error": err}, status_code=code)
        os.kill(pid, signal.SIGKILL)
        return JSONResponse({"killed": {"rank": rank, "pid": pid}, "epoch": controller.epoch})

    async def add_rank(request: Request):
        if not token.check(_presented(request)):
            return _deny()
        err, code = controller.request_add_rank()
        if err:
            return JSONResponse({"error": err}, status_code=code)
        return JSONResponse({"accepted": True, "epoch": controller.epoch,
                             "detail": "a new rank is starting; the scale-up shows in /elastic/status"}, status_code=202)

    async def rebalance(request: Request):
        if not token.check(_presented(request)):
            return _deny()
        body = await request.body()
        try:
            algorithm = json.loads(body).get("algorithm", "ours") if body.strip() else "ours"
        except (ValueError, AttributeError):
            return JSONResponse({"error": 'the body must be empty or JSON {"algorithm": "ours" | "deepseek" |'
                                          ' "elasticity_aware"}'}, status_code=400)
        if not isinstance(algorithm, str):
            return JSONResponse({"error": f"algorithm must be a string, got {algorithm!r}"}, status_code=400)
        err, code = controller.request_rebalance(algorithm)
        if err:
            return JSONResponse({"error": err}, status_code=code)
        return JSONResponse({"accepted": True, "epoch": controller.epoch,
                             "detail": "the experts are placed by their measured loads; /elastic/status shows"
                                       " the decision (eplb.last) and the move (recoveries)"}, status_code=202)

    from sglang.srt.entrypoints import http_server as sglang_http

    async def health(request: Request):
        state = controller.health()
        if state == "failed":
            return JSONResponse({"status": "failed", "detail": controller.failure_reason()}, status_code=503)
        if state == "recovering":
            return JSONResponse({"status": "recovering"}, status_code=200)
        n = controller.recovery_count()
        resp = await sglang_http.health_generate(request)
        if resp.status_code == 503 and controller.recovery_count() != n and controller.health() != "failed" \
                and not _draining():
            _mark_up()  # SGLang's probe timed out on the pause of a recovery that started meanwhile
            return JSONResponse({"status": "recovered"}, status_code=200)
        return resp

    async def ready(request: Request):
        state = controller.health()
        if state != "serving":
            return JSONResponse({"status": state}, status_code=503)
        return await sglang_http.ready()

    # ahead of SGLang's own routes for the same paths (the first match serves)
    probes = [("/health", health), ("/health_generate", health), ("/ready", ready)]
    for path, fn in probes:
        app.add_api_route(path, fn, methods=["GET"])
    routes = app.router.routes
    routes[:0] = [routes.pop() for _ in probes][::-1]

    app.add_api_route("/elastic/status", status, methods=["GET"])
    app.add_api_route("/elastic/rebalance", rebalance, methods=["POST"])
    app.add_api_route("/elastic/add_rank", add_rank, methods=["POST"])
    app.add_api_route("/elastic/inject_failure", inject_failure, methods=["POST"])
