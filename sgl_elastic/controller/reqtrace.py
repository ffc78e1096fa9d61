"""A request trace for diagnosis: where each request went, process by process.

Off unless ``SGLE_TRACE_REQUESTS`` names a directory (read once per process; inherited by the
ranks). Each process then appends one JSON line per event to ``<dir>/reqtrace-<pid>.jsonl``:
``{"t": unix time, "pid", "ev", "rids", ...}``. Events: the tokenizer manager's ``accept``, ``out``
(a batch output: rids, finished or not), ``audit-miss`` and ``lost``; a rank's ``pull`` (rank 0,
from the tokenizer's socket), ``recv`` (after the broadcast), ``queued`` / ``not-queued`` (after
SGLang handled an input), ``resume``, ``failover`` (the requests it carries and re-sends),
``stream`` (what it sends to the detokenizer) and ``held`` (its answer to an audit).

``python -m sgl_elastic.controller.reqtrace DIR RID...`` prints every event of those rids in time
order. Costs one small write per event: a diagnosis tool, not for production.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

ENV = "SGLE_TRACE_REQUESTS"

_dir = os.environ.get(ENV) or None
_lock = threading.Lock()
_file = None
_file_pid = 0


def on() -> bool:
    return _dir is not None


def note(ev: str, rids, **extra) -> None:
    """Append one event (a no-op when the trace is off)."""
    global _file, _file_pid
    if _dir is None:
        return
    rec = {"t": round(time.time(), 4), "pid": os.getpid(), "ev": ev, "rids": [str(r) for r in rids], **extra}
    line = json.dumps(rec, default=str) + "\n"
    with _lock:
        try:
            if _file is None or _file_pid != os.getpid():  # a forked child writes its own file
                _file = open(os.path.join(_dir, f"reqtrace-{os.getpid()}.jsonl"), "a", buffering=1)
                _file_pid = os.getpid()
            _file.write(line)
        except OSError:
            pass


def rids_of(reqs) -> list[str]:
    """The rids of a list of SGLang inputs (batched ones expanded; others skipped)."""
    out = []
    for r in reqs or []:
        r = getattr(r, "tokenized", r)
        for o in getattr(r, "batch", None) or [r]:
            rid = getattr(o, "rid", None)
            if isinstance(rid, str):
                out.append(rid)
    return out


def events(directory: str, rids: set[str]) -> list[dict]:
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.startswith("reqtrace-"):
            continue
        with open(os.path.join(directory, name)) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not rids or rids & set(rec.get("rids") or []):
                    out.append(rec)
    return sorted(out, key=lambda r: r["t"])


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for rec in events(argv[0], set(argv[1:])):
        rids = rec.pop("rids")
        t = rec.pop("t")
        print(time.strftime("%H:%M:%S", time.localtime(t)) + f"{t % 1:.3f}"[1:], rec.pop("pid"), rec.pop("ev"), json.dumps(rec), len(rids), "rids" if len(rids) > 3 else rids)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
