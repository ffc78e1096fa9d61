"""The daemon seen from inside one SGLang scheduler process (one TP rank): what the patches call.

Active when ``SGLE_DAEMON_DIR`` names a daemon run dir (set by ``launch_server --elastic-daemon``;
the token is read from that dir's 0600 file, never passed on a command line). The variable is read
once per process, at plugin load (``patches.load_plugin`` calls :func:`set_run_dir`). Three jobs:

1. Weights (``DaemonModelLoader``). Nothing is read from the checkpoint by a rank, ever, and the
   weights are held once:
   - every start of a rank (first start, restart, rebuild after a failover): the model's
     parameters are bound as views of the daemon's shards of this rank (``shard_views``): the
     daemon lays the shards out in SGLang's fused order, so qkv / gate_up / w13 / w2 are each one
     contiguous range of the segment. No ``load_weights``, no copy; a migration moves exactly
     what the ranks serve from;
   - fallback, when a parameter cannot be such a view (another dtype than the checkpoint's,
     padding, post-processed weights): SGLang's own ``load_weights`` runs on the shards (each
     placed at its offset in a full-shape tensor), and the loaded parameters are *published*
     (copied once into a daemon segment and rebound to it; a restart binds them zero-copy). The
     daemon then holds the model twice.
2. KV pool: ``MHATokenToKVPool``'s per-layer K/V buffers are views of the daemon's pool.
3. Prefix index: rank 0 mirrors its radix cache into the daemon's index (insert, evict, flush);
   a restarted scheduler rebuilds its radix tree from it and takes those slots out of its free
   list, so prompts sharing a prefix with earlier ones hit the KV that survived the crash.

If the daemon dies, the process keeps serving with what it has mapped (CPU shared memory lives
until its last mapping goes) and logs one clear error; mirroring stops (a restart then needs a new
daemon, which reads the checkpoint again). Unquantized models only.
"""

from __future__ import annotations

import os
import sys
import time
from array import array

from sgl_elastic.daemon.client import DaemonError, DaemonUnavailable
from sgl_elastic.daemon.launch import ENV_DIR
from sgl_elastic.daemon.worker import WorkerAttachment
from sgl_elastic.layout.dtypes import dtype_name

__all__ = ["ENV_DIR", "active", "set_run_dir", "DaemonModelLoader", "kv_buffers", "Mirror", "mirror", "log"]

NAMESPACE = ""  # one server per daemon

_run_dir: str | None = None  # the daemon's run dir for this process (None: no daemon)
_kv_backup = False  # mirror the KV into the daemon's backup pool (set_run_dir)
_attachment: WorkerAttachment | None = None
_keep: list = []  # AttachedTensors whose mappings back live parameters / KV buffers


def set_run_dir(run_dir: str | None, kv_backup: bool | None = None) -> None:
    """Point this process at the daemon in ``run_dir`` (None or "": no daemon). ``kv_backup``: mirror
    the KV into the daemon's backup pool (in-place failover with --elastic-kv-backup; None: as before)."""
    global _run_dir, _kv_backup
    _run_dir = run_dir or None
    if kv_backup is not None:
        _kv_backup = bool(kv_backup)


def reset_attachment() -> None:
    """Forget this process's registration (its TP rank changed in a failover); mappings stay valid.
    The prefix mirror is made again for the new rank: rank 0 mirrors, and a rank that became rank 0
    (the old one died) must start, one that stopped being rank 0 must stop."""
    global _attachment, _mirror
    _mirror = None
    if _attachment is not None:
        try:
            _attachment.client.close()
        except Exception:  # noqa: BLE001 - the old connection is abandoned either way
            pass
    _attachment = None


def active() -> bool:
    return _run_dir is not None


def log(msg: str) -> None:
    print(f"[sgl-elastic daemon-link pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def _tp_rank() -> int:
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def attachment() -> WorkerAttachment:
    """This process's registered connection (made on first use, for this process's TP rank)."""
    global _attachment
    if _attachment is None:
        run_dir = _run_dir
        if run_dir is None:
            raise RuntimeError(f"sgl-elastic: no state daemon in this process ({ENV_DIR} was not set at plugin load)")
        try:
            _attachment = WorkerAttachment.connect(run_dir, _tp_rank())
        except (DaemonUnavailable, DaemonError, OSError) as e:
            raise RuntimeError(
                f"sgl-elastic: cannot attach to the state daemon in {run_dir}: {e}. The daemon holds this"
                " server's weights; restart the server (it starts a new daemon, which reads the checkpoint)"
            ) from e
    return _attachment


# ---- 1. weights ------------------------------------------------------------------------------------
def _expand(layout, rank: int, shards: dict):
    """(checkpoint name, full-shape tensor with this rank's shard at its offset) per held tensor.

    The rest of each tensor is left uninitialised: SGLang's loaders (with the elastic layout's
    offsets) read exactly the shard region. One full tensor exists at a time.
    """
    import torch

    from sgl_elastic.layout.geometry import rows_cols, shard_region

    for t in layout.tensors():
        reg = shard_region(t, layout, rank)
        if reg is None:
            continue
        shard = shards[t.name]
        rows, cols = rows_cols(t)
        r0, r1, c0, c1 = reg
        if (r0, r1, c0, c1) == (0, rows, 0, cols):
            yield t.name, shard.view(tuple(t.shape))
            continue
        full = torch.empty(tuple(t.shape), dtype=shard.dtype, device=shard.device)
        full.view(rows, cols)[r0:r1, c0:c1].copy_(shard.reshape(r1 - r0, c1 - c0))
        yield t.name, full


def _bind(model, tensors: dict) -> None:
    """Point every parameter of ``model`` at the published tensor of the same name (no copy)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise RuntimeError(f"sgl-elastic: the daemon's published parameters lack {missing[:5]}...; the model or"
                           " its layout changed since they were published: restart the daemon")
    for name, p in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
            raise RuntimeError(f"sgl-elastic: published {name} is {tuple(t.shape)} {t.dtype} but this process built"
                               f" {tuple(p.shape)} {p.dtype}; restart the daemon")
        p.data = t


def _publish(att: WorkerAttachment, model) -> int:
    """Copy the loaded parameters into a daemon segment, rebind them to it, commit. Returns bytes."""
    params = list(model.named_parameters())
    specs = [(n, dtype_name(p.dtype), tuple(p.shape)) for n, p in params]
    seg = att.client.publish_params(att.rank, specs)
    total = 0
    for name, p in params:
        dst = seg.tensors[name]
        dst.copy_(p.data)
        p.data = dst
        total += dst.numel() * dst.element_size()
    att.client.commit_params(att.rank)
    _keep.append(seg)
    return total


# SGLang's fused parameters, as the checkpoint tensors they concatenate (dim 0, in this order).
_FUSED = (
    (".self_attn.qkv_proj.weight", (".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight")),
    (".mlp.gate_up_proj.weight", (".mlp.gate_proj.weight", ".mlp.up_proj.weight")),
)
_EXPERTS = {  # FusedMoE parameter -> per-expert checkpoint tensors, concatenated per expert
    "w13_weight": (("gate_proj", "up_proj"), ("w1", "w3")),
    "w2_weight": (("down_proj",), ("w2",)),
}


def _parts(name: str, shards: dict) -> list[str] | None:
    """Checkpoint shard names whose bytes, in this order, are SGLang parameter ``name``."""
    if name in shards:
        return [name]
    for fused, pieces in _FUSED:
        if name.endswith(fused):
            stem = name[: -len(fused)]
            return [stem + p for p in pieces]
    for param, namings in _EXPERTS.items():
        if name.endswith(".experts." + param):
            stem = name[: -len(param)]
            for pieces in namings:
                experts = {int(k[len(stem):].split(".", 1)[0]) for k in shards
                           if k.startswith(stem) and k[len(stem):].split(".", 1)[0].isdigit()
                           and k.endswith(f".{pieces[0]}.weight")}
                # in the order they lie in the segment: the rank's slot order (ascending unless redundant)
                experts = sorted(experts, key=lambda e: shards[f"{stem}{e}.{pieces[0]}.weight"].data_ptr())
                if experts:
                    return [f"{stem}{e}.{p}.weight" for e in experts for p in pieces]
    return None


def shard_views(model, shards: dict):
    """Every parameter of ``model`` as a view of the daemon's shards (no copy), or (None, why).

    The daemon lays each rank's shards out in SGLang's fused order (``layout.tensors``: q, k, v;
    gate, up; per expert gate, up, then the downs), so a fused parameter is one contiguous range
    of the segment. Anything else (another dtype, padding, a parameter the checkpoint lacks, a
    post-processed layout) returns None and the caller loads a private copy instead.
    """
    import torch

    views = {}
    for name, p in model.named_parameters():
        parts = _parts(name, shards)
        if parts is None or any(q not in shards for q in parts):
            return None, f"no shard for parameter {name}"
        ts = [shards[q] for q in parts]
        if any(t.dtype != p.dtype for t in ts):
            return None, f"{name}: shards are {ts[0].dtype}, the parameter {p.dtype}"
        if sum(t.numel() for t in ts) != p.numel():
            return None, f"{name}: shards hold {sum(t.numel() for t in ts)} elements, the parameter {tuple(p.shape)}"
        base = ts[0]
        for a, b in zip(ts, ts[1:]):
            if b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
                return None, f"{name}: its shards are not contiguous in the daemon's segment"
        strides = _param_strides(tuple(p.shape), ts)
        if strides is None:
            return None, f"{name}: its shards' layout {ts[0].stride()} does not make a {tuple(p.shape)} view"
        views[name] = torch.as_strided(base, tuple(p.shape), strides, base.storage_offset())
    return views, ""


def _param_strides(shape: tuple[int, ...], parts: list) -> tuple[int, ...] | None:
    """Strides of the parameter of ``shape`` over ``parts`` (back to back in memory): row-major
    parts make a row-major parameter; column-major ones (a transposed shard, the CPU daemon's
    column-sharded tensors) make the parameter column-major in its last two dims: one part
    (``o_proj``) is its own view, several equal ones (``w2`` of the experts) are stacked along a new
    first dim. Anything else: None."""
    import torch

    if all(t.is_contiguous() for t in parts):
        return torch.empty(shape, device="meta").stride()
    first = parts[0]
    if first.dim() != 2 or any(t.shape != first.shape or t.stride() != first.stride() for t in parts):
        return None
    if len(parts) == 1 and shape == tuple(first.shape):
        return tuple(first.stride())
    if len(shape) == 3 and shape[0] == len(parts) and shape[1:] == tuple(first.shape):
        return (first.numel(),) + tuple(first.stride())
    return None


class DaemonModelLoader:
    """SGLang model loader (``BaseModelLoader`` interface) over the daemon. See module docstring."""

    preloaded_weights_bytes = 0  # BaseModelLoader: nothing was resident before ModelRunner's baseline

    def __init__(self, load_config) -> None:
        self.load_config = load_config

    def download_model(self, model_config) -> None:  # nothing to download: the daemon holds it
        return None

    def load_model(self, *, model_config, device_config):
        import torch
        from sglang.srt.model_loader.loader import (
            DefaultModelLoader,
            _get_quantization_config,
            _initialize_model,
            post_load_weights,
            set_default_torch_dtype,
        )

        from sgl_elastic.layout import ElasticLayout

        t0 = time.perf_counter()
        target_device = torch.device(device_config.device)
        quant_config = _get_quantization_config(model_config, self.load_config)
        if quant_config is not None:
            raise NotImplementedError("sgl-elastic: --elastic-daemon supports unquantized checkpoints only")
        with set_default_torch_dtype(model_config.dtype):
            with target_device:
                model = _initialize_model(model_config, self.load_config, quant_config)
        t_init = time.perf_counter()
        att = attachment()
        reg = att.client.register(att.rank)
        shard_att = att.client.attach_weights(att.rank, populate=True)
        att._check_instance(shard_att)
        views, why = shard_views(model, shard_att.tensors)
        published = None if views is not None else att.client.attach_params(att.rank, populate=True)
        if views is not None:
            for name, p in model.named_parameters():
                p.data = views[name]
            _keep.append(shard_att)
            post_load_weights(model)
            how = f"bound to the daemon's shards zero-copy ({shard_att.nbytes / 1e6:.1f} MB, held once)"
        elif published is not None:
            att._check_instance(published)
            _bind(model, published.tensors)
            _keep.append(published)
            post_load_weights(model)
            how = f"attached published parameters zero-copy ({published.nbytes / 1e6:.1f} MB)"
        else:
            log(f"rank {att.rank}: parameters cannot be views of the daemon's shards ({why}); loading a copy")
            layout = ElasticLayout.from_bytes(reg.layout)
            shards = shard_att.tensors
            with set_default_torch_dtype(model_config.dtype):
                DefaultModelLoader.load_weights_and_postprocess(model, _expand(layout, att.rank, shards), target_device)
            shard_att.close() if hasattr(shard_att, "close") else None
            nbytes = _publish(att, model)
            how = f"loaded from the daemon's shards and published ({nbytes / 1e6:.1f} MB)"
        dt = time.perf_counter() - t_init
        log(f"rank {att.rank}: weights {how} in {dt:.3f} s (model init {t_init - t0:.3f} s);"
            " bytes read from the checkpoint: 0")  # by construction: this loader never opens it
        return model.eval()


def held_kv_tokens(page_size: int) -> int:
    """Token slots of the KV pool the daemon holds already (0: none yet)."""
    s = attachment().client.stats()
    if not s.kv.num_slots or s.kv.page_size != page_size:
        return 0
    return s.kv.num_slots - page_size  # rows = size + one padding page (see worker.sglang_kv_rows)


# ---- 2. KV pool ------------------------------------------------------------------------------------
def kv_buffers(pool, k_shape, v_shape):
    """(k_buffer, v_buffer) lists over the daemon's KV pool for ``MHATokenToKVPool`` ``pool``, or None
    when the pool's layout is not the plain NHD one the daemon stores (SGLang then allocates)."""
    if pool.kv_cache_layout != "nhd" or k_shape != v_shape:
        log(f"KV layout {pool.kv_cache_layout!r} (k {k_shape}, v {v_shape}) is not kept in the daemon; "
            "this process allocates its own KV (no prefix reuse after a restart)")
        return None
    att = attachment()
    t0 = time.perf_counter()
    backup = _kv_backup  # in-place failover: a backup (at tp >= 2) keeps the KV over a failure
    k, v = att.kv_buffers(num_layers=pool.layer_num, head_dim=k_shape[2], size=pool.size,
                          page_size=pool.page_size, dtype=dtype_name(pool.store_dtype), backup=backup)
    pool._sgle_kv_backup = att.kv_backup_buffers(num_layers=pool.layer_num, size=pool.size,
                                                 page_size=pool.page_size) if backup else None
    if tuple(k[0].shape) != tuple(k_shape) or k[0].dtype != pool.store_dtype:
        raise RuntimeError(f"sgl-elastic: the daemon's KV pool has rows {tuple(k[0].shape)} {k[0].dtype} but SGLang"
                           f" wants {tuple(k_shape)} {pool.store_dtype}")
    log(f"rank {att.rank}: KV pool attached from the daemon ({len(k)} layers x {tuple(k_shape)}"
        f"{', with its backup' if pool._sgle_kv_backup is not None else ''}) in {time.perf_counter() - t0:.3f} s")
    return k, v


# ---- 3. prefix index ---------------------------------------------------------------------------------
class Mirror:
    """Rank 0's mirror of its radix cache in the daemon's prefix index.

    Ordering matters for correctness: a freed slot is forgotten by the daemon (a synchronous
    round trip) before SGLang can hand it to another request. If a call fails the mirror stops and
    clears the daemon's index when it can; if it cannot, the daemon is gone and nothing will read
    the index again (a restarted daemon starts empty).
    """

    def __init__(self) -> None:
        self.enabled = active() and _tp_rank() == 0
        self.broken = False

    def _call(self, fn) -> None:
        if not self.enabled or self.broken:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - housekeeping: any failure (also "cannot attach": the daemon
            self.broken = True   # died) stops the mirror, never the forward or a result's processing
            log(f"ERROR: the state daemon stopped answering ({e}). Serving continues with the weights and KV"
                " already mapped; prefix reuse across restarts is off, and a restart needs a new daemon (which"
                " reads the checkpoint again).")
            try:
                attachment().client.kv_clear()
            except Exception:  # noqa: BLE001 - the daemon is gone: nobody will read its index
                pass

    def insert(self, token_ids, slots) -> None:
        self._call(lambda: attachment().client.kv_insert(list(token_ids), list(slots), namespace=NAMESPACE))

    def forget(self, slots) -> None:
        self._call(lambda: attachment().client.kv_forget(list(slots), namespace=NAMESPACE))

    def clear(self) -> None:
        self._call(lambda: attachment().client.kv_clear())


_mirror: Mirror | None = None


def mirror() -> Mirror:
    global _mirror
    if _mirror is None:
        _mirror = Mirror()
    return _mirror


def restore_prefixes(cache) -> int:
    """Rebuild ``cache`` (a RadixCache) from the daemon's index and remove those slots from the free
    list of its allocator. Every rank does the same, from the same index, before serving."""
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    alloc = cache.token_to_kv_pool_allocator
    if cache.disable or alloc is None or cache.page_size != 1 or not hasattr(alloc, "free_pages"):
        return 0
    try:
        entries = attachment().client.kv_dump().entries
    except (DaemonUnavailable, DaemonError) as e:
        log(f"prefix index not restored: {e}")
        return 0
    used: set[int] = set()
    for e in entries:
        if e.namespace != NAMESPACE or not e.token_ids:
            continue
        value = torch.tensor(e.slots, dtype=torch.int64, device=cache.device)
        cache.insert(InsertParams(key=RadixKey(array("q", e.token_ids), None), value=value))
        used.update(e.slots)
    if used:
        if getattr(alloc, "release_pages", None) is not None and len(alloc.release_pages):
            alloc.merge_and_sort_free()
        taken = torch.tensor(sorted(used), dtype=torch.int64, device=alloc.free_pages.device)
        keep = ~torch.isin(alloc.free_pages, taken)
        alloc.free_pages = alloc.free_pages[keep]
    log(f"rank {_tp_rank()}: restored {len(used)} cached KV slots ({len(entries)} prefixes) from the daemon")
    return len(used)
