"""The integration tests' kit: shared constants, HF references and the server factory.

Constants (import them: ``from tests.integration.conftest import PROMPTS, TOKEN``; the test commands
run from the repository root, as ``scripts/test.sh`` does):
- ``TOKEN`` / ``AUTH``: the admin token every server of these tests is started with, and its header;
- ``PROMPTS``: four token-id prompts of different lengths; ``MAX_NEW``: the usual answer length.

References (module-scoped fixtures; HF's greedy float32 tokens through ``hf_tokens`` of
``tests/conftest.py``, computed once per arguments in a session). Each module states what it
checks against in its own constants, read here, so the differences stay explicit:
- ``want``: ``hf_tokens(family, <module>.PROMPTS, <module>.MAX_NEW)``;
- ``want_long``: ``hf_tokens(family, <module>.PROMPTS[:2], <module>.LONG)`` (the long streams);
- ``family``: ``<module>.FAMILY``; a module with a parametrized case overrides this fixture.

Servers: ``serve(family, tp, *extra_args, env=None, sglang_files=False)``, a context manager: a
``ServerProcess`` on 127.0.0.1 and a free port, float32, ``--elastic-admin-token TOKEN``; on exit it
stops the server and asserts that none of its processes (noted at start, at the end, and whenever
the test calls ``srv.note_children()``) is left and no daemon segment (with ``sglang_files`` also
no SGLang file of its processes) stayed in /dev/shm.

Clients and waits live in ``sgl_elastic.testing.clients``; no test module imports another.
"""

from __future__ import annotations

import contextlib

import pytest

from sgl_elastic.testing.server import ServerProcess, stop_and_check_leaks

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [[1, 5, 9, 33, 70, 100], [200, 3, 4], [42, 17], [7, 8, 9, 10]]
MAX_NEW = 24


def _module_const(request, name: str):
    try:
        return getattr(request.module, name)
    except AttributeError:
        raise pytest.UsageError(f"{request.module.__name__} uses a fixture that needs its constant {name}") from None


@pytest.fixture(scope="module")
def family(request):
    """The model family of the module's server (``FAMILY``)."""
    return _module_const(request, "FAMILY")


@pytest.fixture(scope="module")
def want(request, hf_tokens, family):
    """HF's greedy tokens: every one of the module's ``PROMPTS``, ``MAX_NEW`` new tokens each."""
    return hf_tokens(family, _module_const(request, "PROMPTS"), _module_const(request, "MAX_NEW"))


@pytest.fixture(scope="module")
def want_long(request, hf_tokens, family):
    """HF's greedy tokens of the long streams: the module's first two ``PROMPTS``, ``LONG`` tokens each."""
    return hf_tokens(family, _module_const(request, "PROMPTS")[:2], _module_const(request, "LONG"))


@pytest.fixture(scope="session")
def serve(tiny_models):
    """``with serve(family, tp, *extra_args, env=None, sglang_files=False) as srv:`` (see the module doc)."""

    @contextlib.contextmanager
    def start(family: str, tp: int, *extra_args: str, env: dict | None = None, sglang_files: bool = False):
        srv = ServerProcess(tiny_models[family], tp_size=tp, env=env, extra_args=[
            "--dtype", "float32", "--elastic-admin-token", TOKEN, *extra_args])
        srv.start()
        srv.note_children()
        try:
            yield srv
        finally:
            if srv.proc.poll() is None:
                srv.note_children()
            code = stop_and_check_leaks(srv, sorted(srv.seen_pids), sglang_files=sglang_files)
            assert code is not None, f"the server's main process did not exit:\n{srv.log_tail()}"

    return start
