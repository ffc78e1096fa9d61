"""Patch of SGLang's ``managers/tp_worker.py``: the TP worker gets the scheduler process's tokenizer
(``patches.scheduler.get_tokenizer``: loaded once per process, not again in every rebuild)."""

from __future__ import annotations

from sgl_elastic.patches import scheduler as _scheduler


def get_tokenizer(original, *args, **kwargs):
    """TpModelWorker's ``get_tokenizer``: the memo of ``patches.scheduler.get_tokenizer``."""
    return _scheduler.get_tokenizer(original, *args, **kwargs)
