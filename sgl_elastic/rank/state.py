"""The elastic layout active in this process, and the shard plan of the block being built.

Read once at the edge: the main process sets it in :func:`sgl_elastic.patches.activate`; every
spawned SGLang process decodes it from the ``SGLE_LAYOUT`` environment variable in
:func:`sgl_elastic.patches.load_plugin` (the ``sglang.srt.plugins`` entry point). Hooks call
:func:`layout` and pass straight through to SGLang when it is None, so a vanilla SGLang run in the
same venv is untouched.

Imports no torch and no sglang (it is imported by the plugin entry point in every SGLang process).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import os

from sgl_elastic.layout import ElasticLayout

ENV_VAR = "SGLE_LAYOUT"

_layout: ElasticLayout | None = None


def encode(layout: ElasticLayout) -> str:
    """ElasticLayout -> ASCII for an environment variable (base64 of its msgpack bytes)."""
    return base64.b64encode(layout.to_bytes()).decode("ascii")


def decode(text: str) -> ElasticLayout:
    return ElasticLayout.from_bytes(base64.b64decode(text.encode("ascii")))


def set_layout(layout: ElasticLayout | None) -> None:
    global _layout
    _layout = layout


def load_from_env() -> ElasticLayout | None:
    """Set and return the layout carried by ``SGLE_LAYOUT`` (None when the variable is unset)."""
    text = os.environ.get(ENV_VAR)
    set_layout(decode(text) if text else None)
    return _layout


def layout() -> ElasticLayout | None:
    """The active layout, or None (hooks then behave exactly like SGLang)."""
    return _layout


_map_epoch = 0  # the recovery epoch whose layout (and so expert map) this process builds and serves


def set_map_epoch(epoch: int) -> None:
    """Set by an in-place rebuild before its new model is built (0: the launch's layout)."""
    global _map_epoch
    _map_epoch = int(epoch)


def map_epoch() -> int:
    return _map_epoch


# ---- the plan of the block under construction ---------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class AttnPlan:
    """This rank's share of one attention block (heads, not elements).

    q_heads / kv_heads: ``[start, end)`` of the global query / KV heads this rank holds.
    """

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    total_q_heads: int
    total_kv_heads: int

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


@dataclasses.dataclass(frozen=True, slots=True)
class BlockPlan:
    """This rank's share of one MLP block: intermediate columns ``[start, start + size)`` of ``total``."""

    family: str
    start: int
    size: int
    total: int


_building: contextvars.ContextVar[AttnPlan | BlockPlan | None] = contextvars.ContextVar(
    "sgl_elastic_building", default=None
)


@contextlib.contextmanager
def building(plan: AttnPlan | BlockPlan):
    """While a block is constructed, its linear layers take their width from ``plan``."""
    token = _building.set(plan)
    try:
        yield plan
    finally:
        _building.reset(token)


def current_plan() -> AttnPlan | BlockPlan | None:
    return _building.get()
