"""Patch of ``sglang.srt.eplb.expert_location``: no equal-split placement metadata under elastic EP.

SGLang's initial expert-location metadata asserts ``physical_experts % ep_size == 0`` and places
``physical // ep`` experts per rank. Under elastic expert parallelism the FusedMoE layers place
experts by the layout (``patches.fused_moe``) and ignore the metadata, so none is built (SGLang
handles a None metadata: no EPLB dispatch, a no-op distribution recorder).
"""

from __future__ import annotations

from sgl_elastic.rank import state


def compute_initial_expert_location_metadata(original, *args, **kwargs):
    layout = state.layout()
    if layout is not None and layout.expert_parallel:
        return None
    return original(*args, **kwargs)
