"""Patch of ``sglang.srt.configs.update_config``: no head / intermediate padding on CPU.

SGLang pads heads and intermediate sizes to a multiple of tp on CPU
(``adjust_config_with_unaligned_cpu_tp``); with an elastic layout every rank holds whole units
instead, so the model config must keep its true sizes.
"""

from __future__ import annotations

from sgl_elastic.rank import state


def adjust_config_with_unaligned_cpu_tp(original, model_config, load_config, tp_size):
    layout = state.layout()
    if layout is None or layout.tp_size != tp_size or tp_size == 1:
        return original(model_config, load_config, tp_size)
    return model_config
