"""Every change sgl-elastic makes to SGLang: one module per patched SGLang module, one table.

The table is ``patches.table.PATCHES`` (target, hook type, our hook, one-line reason).

How the patches become active (main process and every spawned SGLang process):
1. :func:`activate` (the launcher, or a test before ``sgl.Engine``) builds the ``ElasticLayout``
   from the model config and the ``--elastic-*`` options, fails with a ValueError that says the
   arithmetic if the widths are bad (before any process starts), installs the patches in this
   process and puts the layout in ``SGLE_LAYOUT``, which spawned processes inherit.
2. Each SGLang process calls ``sglang.srt.plugins.load_plugins()``, which runs
   :func:`load_plugin` through our entry point in the ``sglang.srt.plugins`` group. Without
   ``SGLE_LAYOUT`` it does nothing, so vanilla SGLang runs in the same venv are untouched.

Kept import-light: importing this package imports neither torch nor sglang.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from sgl_elastic.rank.state import ENV_VAR

__all__ = ["activate", "deactivate", "load_plugin", "build_layout", "daemon_layout", "ENV_VAR", "SUPPORTED_MODEL_TYPES"]

# HF model_type -> what the patched attention / MLP / MoE constructors cover (patches/models.py).
SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3", "mixtral")


def _get(server_args: Any, name: str, default=None):
    if isinstance(server_args, Mapping):
        return server_args.get(name, default)
    return getattr(server_args, name, default)


def _capacities(tp_size: int, server_args: Any) -> list[float]:
    """Free memory per rank for the "capacity" policy (bytes; equal on CPU, where ranks share it)."""
    device = _get(server_args, "device", None)
    try:
        import torch

        if device != "cpu" and torch.cuda.is_available():
            base = _get(server_args, "base_gpu_id", 0) or 0
            step = _get(server_args, "gpu_id_step", 1) or 1
            return [float(torch.cuda.mem_get_info(base + r * step)[0]) for r in range(tp_size)]
    except Exception:  # noqa: BLE001 - no usable accelerator: fall back to equal capacities
        pass
    return [1.0] * tp_size


def build_layout(elastic_args, server_args):
    """The ElasticLayout for ``server_args`` (ServerArgs or a dict of ``sgl.Engine`` kwargs).

    Returns None for a model type the patches do not cover when no widths were asked for (SGLang
    then runs unpatched). Raises ValueError with the arithmetic when the widths do not fit the model.
    """
    from transformers import AutoConfig

    from sgl_elastic.layout import ElasticLayout

    tp = int(_get(server_args, "tp_size", 1) or 1)
    ep = int(_get(server_args, "ep_size", 1) or 1)
    elastic_args.check_tp_size(tp)
    model_path = _get(server_args, "model_path")
    hf_config = AutoConfig.from_pretrained(
        model_path,
        trust_remote_code=bool(_get(server_args, "trust_remote_code", False)),
        revision=_get(server_args, "revision", None),
    )
    if hasattr(hf_config, "get_text_config"):
        hf_config = hf_config.get_text_config()
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        if elastic_args.tp_widths is not None:
            raise ValueError(
                f"--elastic-tp-widths: model type {model_type!r} is not supported by the elastic patches "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); drop the flag to run it with SGLang's own sharding"
            )
        return None
    if ep not in (1, tp):
        raise ValueError(f"--ep-size {ep} with --tp {tp}: elastic widths support --ep-size 1 or --ep-size {tp}")
    red = getattr(elastic_args, "redundant_experts", 0)
    if red and not (ep > 1 and ep == tp):
        raise ValueError(f"--elastic-redundant-experts {red} needs expert parallelism: --ep-size {tp} (== --tp)")
    policy = elastic_args.width_policy
    layout = ElasticLayout.from_hf_config(
        hf_config,
        tp,
        attn_widths=elastic_args.tp_widths,
        policy=policy,
        capacities=_capacities(tp, server_args) if policy == "capacity" and elastic_args.tp_widths is None else None,
        expert_parallel=ep > 1,
        redundant_experts=red,
    )
    attn = layout.family("attn")
    if attn.replicated:  # fewer KV heads than ranks: SGLang's own replication (or CPU padding)
        if elastic_args.tp_widths is not None:
            raise ValueError(
                f"--elastic-tp-widths: {attn.num_kv_heads} KV heads on {tp} ranks needs KV-head replication, "
                f"which the elastic patches do not implement yet; use at most {attn.num_kv_heads} ranks"
            )
        return None
    return layout


def daemon_layout(elastic_args, server_args):
    """The layout the daemon holds: the elastic layout (tp >= 2), or one rank holding all at tp 1."""
    tp = int(getattr(server_args, "tp_size", 1) or 1)
    if int(getattr(server_args, "pp_size", 1) or 1) != 1 or int(getattr(server_args, "dp_size", 1) or 1) != 1:
        raise ValueError("the state daemon supports tensor parallelism only (no --pp-size / --dp-size)")
    if getattr(server_args, "quantization", None):
        raise ValueError("the state daemon supports unquantized checkpoints only (drop --quantization)")
    if getattr(server_args, "load_format", "auto") not in ("auto", "safetensors"):
        raise ValueError(f"the state daemon reads safetensors checkpoints (got --load-format {server_args.load_format})")
    layout = build_layout(elastic_args, server_args)
    if layout is None:
        raise ValueError(f"model {server_args.model_path!r} has no elastic layout at --tp {tp} (supported model"
                         f" types: {', '.join(SUPPORTED_MODEL_TYPES)}; at most one rank per KV head)")
    return layout


def activate(elastic_args, server_args):
    """Validate, install the patches here, and hand the layout to every process spawned after.

    ``server_args``: SGLang ``ServerArgs`` or a dict of ``sgl.Engine`` kwargs (model_path,
    tp_size, ep_size). Returns the ElasticLayout, or None at tp 1 (nothing to shard).
    Call :func:`deactivate` to run a vanilla engine from the same process afterwards.
    """
    from sgl_elastic.patches import table
    from sgl_elastic.rank import state

    layout = build_layout(elastic_args, server_args)
    if layout is None or layout.tp_size == 1:
        deactivate()
        return None
    table.install()
    state.set_layout(layout)
    os.environ[ENV_VAR] = state.encode(layout)
    return layout


def deactivate() -> None:
    """Stop handing a layout to new processes; hooks in this process pass through again."""
    from sgl_elastic.rank import state

    os.environ.pop(ENV_VAR, None)
    state.set_layout(None)


def load_plugin() -> None:
    """``sglang.srt.plugins`` entry point: install the patches when ``SGLE_LAYOUT`` is set.

    SGLang's ``load_plugins`` logs and swallows plugin exceptions; a process that cannot apply
    the layout it was given must not serve with equal shards instead, so failures exit loudly.
    """
    from sgl_elastic.daemon.launch import ENV_DIR as DAEMON_ENV

    from sgl_elastic.controller.wire import ENV_CONTROL, ENV_HEARTBEAT, ENV_KV_BACKUP

    layout_env, daemon_dir = os.environ.get(ENV_VAR), os.environ.get(DAEMON_ENV)  # read once, here
    control, heartbeat = os.environ.get(ENV_CONTROL), os.environ.get(ENV_HEARTBEAT)
    if not layout_env and not daemon_dir:
        return
    from sgl_elastic.patches import table
    from sgl_elastic.rank import state

    try:
        if layout_env:
            state.load_from_env()
        table.install()
        if daemon_dir:  # the daemon's radix-cache backend (--radix-cache-backend)
            from sgl_elastic.patches import radix_backend
            from sgl_elastic.rank import daemon_link

            # the KV backup pool serves in-place failover only (--elastic-kv-backup)
            daemon_link.set_run_dir(daemon_dir, kv_backup=bool(control) and os.environ.get(ENV_KV_BACKUP) == "1")
            radix_backend.register()
        if control:  # in-place failover: survivors of a dead rank rebuild instead of exiting
            from sgl_elastic.rank import failover

            failover.set_control_addr(control, float(heartbeat) if heartbeat else 0.0)
    except Exception as exc:
        print(f"sgl-elastic: cannot apply the elastic layout in this process: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(f"sgl-elastic: {exc}") from exc
