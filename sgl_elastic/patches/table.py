"""THE table of every change sgl-elastic makes to SGLang 0.5.23, and its installer.

One row per patched symbol: the SGLang target, the hook type (SGLang's ``HookRegistry``:
before / after / around / replace; or "register" for a registration through one of SGLang's own
extension points, applied by the hook module's ``register()``), our hook, and why. Hooks live in one module per patched SGLang
module (``patches/<module>.py``). Every hook passes straight through to SGLang when no elastic
layout is active in the process (``rank.state.layout() is None``).

``install()`` checks the SGLang version and that every target exists *before* registering anything,
and after applying checks that SGLang's registry really patched every target (it only logs
failures): a mismatch is a loud ``PatchTargetError`` at start-up, never a silent vanilla run.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

_L = "sglang.srt.layers.linear"
_MOE = "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE"
_P = "sgl_elastic.patches"

HOOK_KINDS = ("before", "after", "around", "replace")  # through HookRegistry (applied by install())
KINDS = (*HOOK_KINDS, "register")  # "register": target is SGLang's registration function, hook what we register


@dataclasses.dataclass(frozen=True, slots=True)
class Patch:
    target: str  # dotted path of the SGLang symbol
    kind: str  # "before" | "after" | "around" | "replace" (HookRegistry.HookType) | "register"
    hook: str  # dotted path of our hook
    reason: str  # one line: why SGLang needs this change


PATCHES: tuple[Patch, ...] = (
    # -- layers/linear.py: unequal shard widths in the four TP linear layers
    Patch(f"{_L}.QKVParallelLinear.__init__", "around", f"{_P}.linear.qkv_init",
          "allocate this rank's whole KV-head groups, not total_heads // tp"),
    Patch(f"{_L}.MergedColumnParallelLinear.__init__", "around", f"{_P}.linear.merged_column_init",
          "gate_up gets this rank's intermediate columns; SGLang asserts output % tp == 0"),
    Patch(f"{_L}.ColumnParallelLinear.__init__", "around", f"{_P}.linear.column_init",
          "plain column layers in an elastic block take the block's width"),
    Patch(f"{_L}.RowParallelLinear.__init__", "around", f"{_P}.linear.row_init",
          "o_proj / down_proj get this rank's input columns, not input // tp"),
    Patch(f"{_L}.ColumnParallelLinear.weight_loader", "around", f"{_P}.linear.weight_loader",
          "load from this rank's offset, not tp_rank * shard_size"),
    Patch(f"{_L}.MergedColumnParallelLinear.weight_loader", "around", f"{_P}.linear.weight_loader",
          "load gate / up from this rank's offsets, not tp_rank * shard_size"),
    Patch(f"{_L}.QKVParallelLinear.weight_loader", "around", f"{_P}.linear.weight_loader",
          "load q / k / v from this rank's head offsets, not tp_rank * shard_size"),
    Patch(f"{_L}.RowParallelLinear.weight_loader", "around", f"{_P}.linear.weight_loader",
          "load from this rank's input offset, not tp_rank * shard_size"),
    Patch(f"{_L}.ColumnParallelLinear.weight_loader_v2", "around", f"{_P}.linear.weight_loader_v2",
          "v2 (quantized) parameter loaders assume equal shards: refuse loudly on elastic layers"),
    Patch(f"{_L}.MergedColumnParallelLinear.weight_loader_v2", "around", f"{_P}.linear.weight_loader_v2",
          "same, merged column"),
    Patch(f"{_L}.QKVParallelLinear.weight_loader_v2", "around", f"{_P}.linear.weight_loader_v2",
          "same, QKV"),
    Patch(f"{_L}.RowParallelLinear.weight_loader_v2", "around", f"{_P}.linear.weight_loader_v2",
          "same, row"),
    Patch(f"{_L}.RowParallelLinear.forward", "before", f"{_P}.linear.row_forward",
          "input split of a replicated input is split_tensor_along_last_dim (equal widths)"),
    Patch(f"{_L}.ColumnParallelLinear.forward", "around", f"{_P}.linear.column_forward",
          "gather_output is an equal-width all-gather"),
    # -- models/*.py: attention blocks assert heads % tp == 0; dense MLP blocks
    Patch("sglang.srt.models.qwen3_moe.Qwen3MoeAttention.__init__", "around", f"{_P}.models.attention_init",
          "per-rank q / kv heads from whole KV-head groups (asserts heads % tp == 0)"),
    Patch("sglang.srt.models.qwen3.Qwen3Attention.__init__", "around", f"{_P}.models.attention_init",
          "same, Qwen3"),
    Patch("sglang.srt.models.mixtral.MixtralAttention.__init__", "around", f"{_P}.models.attention_init",
          "same, Mixtral"),
    Patch("sglang.srt.models.qwen2.Qwen2MLP.__init__", "around", f"{_P}.models.mlp_init",
          "Qwen3 dense MLP (Qwen3MLP is this class) takes the 'mlp' family width"),
    Patch("sglang.srt.models.qwen2_moe.Qwen2MoeMLP.__init__", "around", f"{_P}.models.mlp_init",
          "Qwen3-MoE dense layers (Qwen3MoeMLP is this class) take the 'mlp' family width"),
    # -- layers/moe/fused_moe_triton/layer.py: MoE TP with unequal intermediate widths
    Patch(f"{_MOE}.__init__", "around", f"{_P}.fused_moe.fused_moe_init",
          "intermediate_size_per_partition = this rank's columns (SGLang asserts % moe_tp == 0)"),
    Patch(f"{_MOE}._load_w13", "around", f"{_P}.fused_moe.load_w13",
          "gate/up slice starts at this rank's offset, not shard_size * moe_tp_rank"),
    Patch(f"{_MOE}._load_w2", "around", f"{_P}.fused_moe.load_w2",
          "down slice starts at this rank's offset, not shard_size * moe_tp_rank"),
    Patch(f"{_MOE}.forward_impl", "around", f"{_P}.fused_moe.forward_impl",
          "elastic EP: refuse to dispatch under an expert map of another recovery epoch (stale routing)"),
    Patch(f"{_MOE}._map_global_expert_id_to_local_expert_id", "around", f"{_P}.fused_moe.map_global_expert_id",
          "expert parallelism: this rank's first expert is the layout offset, not rank * num_local"),
    # -- distributed/bootstrap.py: CPU thread pools
    Patch("sglang.srt.distributed.bootstrap._init_cpu_threads_env", "around", f"{_P}.bootstrap.init_cpu_threads_env",
          "without AMX every CPU rank keeps a pool of all cores: size it to its OMP bind entry"),
    Patch("sglang.srt.layers.moe.fused_moe_native.moe_forward_native", "around",
          f"{_P}.fused_moe_native.moe_forward_native",
          "CPU EP crash: -1 ids of other ranks' experts index cnts.scatter_"),
    Patch("sglang.srt.eplb.expert_location.compute_initial_expert_location_metadata", "around",
          f"{_P}.expert_location.compute_initial_expert_location_metadata",
          "its placement asserts experts % ep == 0; elastic EP places experts by the layout"),
    # -- vocab embedding and LM head
    Patch("sglang.srt.layers.vocab_parallel_embedding.VocabParallelEmbedding.__init__", "around",
          f"{_P}.vocab_parallel_embedding.vocab_init",
          "this rank's vocab rows from the layout, not padded_vocab // tp"),
    Patch("sglang.srt.layers.logits_processor.LogitsProcessor.__init__", "after",
          f"{_P}.logits_processor.logits_processor_init",
          "the logits all-gather concatenates equal shards; gather the layout's vocab widths"),
    # -- configs: KV pool per rank, no CPU padding
    Patch("sglang.srt.configs.model_config.ModelConfig.get_num_kv_heads", "around",
          f"{_P}.model_config.get_num_kv_heads",
          "KV pool sized for this rank's KV heads, not total // tp"),
    Patch("sglang.srt.configs.update_config.adjust_config_with_unaligned_cpu_tp", "around",
          f"{_P}.update_config.adjust_config_with_unaligned_cpu_tp",
          "CPU pads heads / intermediate to a multiple of tp; elastic ranks hold whole units instead"),
    # -- state daemon (--elastic-daemon): weights, KV pool and prefix index outlive the schedulers
    Patch("sglang.srt.model_executor.model_runner_components.load_model_utils.get_model_loader", "around",
          f"{_P}.load_model_utils.get_model_loader",
          "ranks take their weights from the daemon (0 bytes from the checkpoint), zero-copy after the first start"),
    Patch("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.calculate_pool_sizes", "around",
          f"{_P}.pool_configurator.calculate_pool_sizes",
          "a restarted scheduler sizes its KV pool as the one the daemon holds (free memory differs by then)"),
    Patch("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal", "around",
          f"{_P}.memory_pool.create_buffers_normal",
          "the KV pool is daemon memory, so KV survives a scheduler restart"),
    Patch("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.set_kv_buffer", "after",
          f"{_P}.memory_pool.set_kv_buffer",
          "in-place failover: each KV write is mirrored into the rank's backup, so a failover keeps the KV"),
    Patch("sglang.srt.entrypoints.engine.Engine._launch_scheduler_processes", "around",
          f"{_P}.engine.launch_scheduler_processes",
          "SGLang has no scheduler respawn: record the launch so the supervisor can redo it"),
    Patch("sglang.srt.entrypoints.engine.Engine._launch_subprocesses", "around", f"{_P}.engine.launch_subprocesses",
          "the supervisor needs the tokenizer manager to fail requests in flight explicitly"),
    Patch("sglang.srt.utils.watchdog.SubprocessWatchdog._check_processes", "around",
          f"{_P}.watchdog.watchdog_check_processes",
          "a dead scheduler triggers a restart from the daemon instead of killing the server"),
    Patch("sglang.srt.managers.tokenizer_manager.SignalHandler.running_phase_sigquit_handler", "around",
          f"{_P}.tokenizer_manager.running_phase_sigquit_handler",
          "a surviving rank's SIGQUIT after a peer died must not kill the server during the restart"),
    Patch("sglang.srt.mem_cache.registry.register_radix_cache_backend", "register", f"{_P}.radix_backend.factory",
          "radix-cache backend sgl-elastic-daemon: the prefix tree is mirrored into the daemon and rebuilt after a restart"),
    Patch("sglang.srt.managers.tokenizer_manager.TokenizerManager._dispatch_to_scheduler", "around",
          f"{_P}.tokenizer_manager.dispatch_to_scheduler",
          "failover: record each request's tokenized input where it is dispatched (to re-submit it)"),
    Patch("sglang.srt.managers.tokenizer_manager.TokenizerManager._async_dispatch_to_scheduler", "around",
          f"{_P}.tokenizer_manager.async_dispatch_to_scheduler", "same, on the async dispatch path"),
    Patch("sglang.srt.managers.tokenizer_manager.TokenizerManager._handle_batch_output", "around",
          f"{_P}.tokenizer_manager.handle_batch_output",
          "failover: time to first success after a fault; drop dispatch records of finished requests"),
    Patch("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", "around",
          f"{_P}.tokenizer_manager.validate_one_request",
          "input token ids outside the vocabulary get a 400; SGLang lets them reach the forward, where"
          " one kills a rank (CPU, tp 1) and failover would resume the request on the survivors"),
    # -- in-place failover (scheduler processes): survivors of a dead rank rebuild, they do not exit
    Patch("sglang.srt.managers.scheduler.Scheduler.run_event_loop", "around", f"{_P}.scheduler.run_event_loop",
          "a failed collective ends SGLang's scheduler process; survivors rebuild in place under the new layout"),
    Patch("sglang.srt.managers.scheduler.Scheduler.__init__", "around", f"{_P}.scheduler.scheduler_init",
          "a rebuilt scheduler needs the original port_args (SGLang does not keep them)"),
    Patch("sglang.srt.managers.scheduler.get_tokenizer", "around", f"{_P}.scheduler.get_tokenizer",
          "the tokenizer is loaded once per scheduler process, not twice per scheduler (a rebuild paid 0.1-0.16 s)"),
    Patch("sglang.srt.managers.tp_worker.get_tokenizer", "around", f"{_P}.tp_worker.get_tokenizer",
          "the TP worker shares the scheduler process's tokenizer (same memo)"),
    Patch("sglang.srt.managers.scheduler.Scheduler.handle_generate_request", "around",
          f"{_P}.scheduler.handle_generate_request",
          "keep each request's tokenized input on its Req, to resume it in the next epoch"),
    Patch("sglang.srt.managers.scheduler.Scheduler.process_input_requests", "around",
          f"{_P}.scheduler.process_input_requests",
          "resumed requests are re-created with the output ids they had (retraction semantics)"),
    Patch("sglang.srt.managers.scheduler_components.request_receiver.SchedulerRequestReceiver._pull_raw_reqs",
          "around", f"{_P}.request_receiver.pull_raw_reqs",
          "the new rank 0's first broadcast carries the resumed requests to every survivor"),
    Patch("sglang.srt.managers.scheduler_components.request_receiver.SchedulerRequestReceiver."
          "_broadcast_reqs_across_ranks", "around", f"{_P}.request_receiver.broadcast_reqs",
          "inputs pulled from the tokenizer are lost if their broadcast fails: keep them to re-send"),
    Patch("sglang.srt.managers.scheduler_components.ipc_channels.SchedulerIpcChannels.create", "around",
          f"{_P}.ipc_channels.ipc_channels_create",
          "a rank 0 that stays rank 0 keeps its ZMQ channels (requests queued during the failover are kept)"),
)


class PatchTargetError(RuntimeError):
    """An SGLang symbol sgl-elastic patches is missing or was not patched (SGLang changed)."""


def _resolve(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(pkgutil.resolve_name(module), attr)


def check_targets(patches: tuple[Patch, ...] = PATCHES) -> None:
    """Raise PatchTargetError listing every target or hook that does not resolve."""
    from sgl_elastic.version_check import check_sglang_version

    check_sglang_version()
    bad = []
    for p in patches:
        for path in (p.target, p.hook):
            try:
                obj = _resolve(path)
            except Exception as exc:  # noqa: BLE001 - reported below with the path
                bad.append(f"{path}: {type(exc).__name__}: {exc}")
                continue
            if not callable(obj):
                bad.append(f"{path}: not callable ({type(obj).__name__})")
    if bad:
        raise PatchTargetError(
            "sgl-elastic cannot patch this SGLang (pinned to 0.5.23); these targets are missing:\n  "
            + "\n  ".join(bad)
            + "\nreinstall the pinned version (pip install --no-deps sglang==0.5.23)"
        )


_registered = False


def install(patches: tuple[Patch, ...] = PATCHES) -> None:
    """Check, register and apply every patch in this process (idempotent)."""
    global _registered
    from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType

    hooks = tuple(p for p in patches if p.kind in HOOK_KINDS)
    if not _registered:
        check_targets(patches)
        source = HookSource(plugin_name="sgl_elastic", dist_name="sgl-elastic")
        for p in hooks:
            module, _, name = p.hook.rpartition(".")
            hook = getattr(importlib.import_module(module), name)
            HookRegistry.register(p.target, hook, HookType(p.kind), source=source)
        _registered = True
    HookRegistry.apply_hooks()
    not_applied = sorted({p.target for p in hooks} - HookRegistry._patched)
    if not_applied:
        raise PatchTargetError(
            "SGLang's HookRegistry did not apply these sgl-elastic patches (see its log above):\n  "
            + "\n  ".join(not_applied)
        )


def table_markdown() -> str:
    """The table as markdown (for docs and the start-up log)."""
    rows = ["| SGLang target | hook | ours | why |", "| --- | --- | --- | --- |"]
    for p in PATCHES:
        rows.append(f"| `{p.target.removeprefix('sglang.srt.')}` | {p.kind} | `{p.hook.removeprefix(_P + '.')}` | {p.reason} |")
    return "\n".join(rows)
