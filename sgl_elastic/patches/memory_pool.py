"""Patch of SGLang's ``mem_cache/memory_pool.py`` for the state daemon (``--elastic-daemon``): the KV
pool lives in the daemon, and with in-place failover every write is mirrored into the rank's backup.

Passes straight through unless ``SGLE_DAEMON_DIR`` was set at plugin load.
"""

from __future__ import annotations

from sgl_elastic.rank import daemon_link as link


def create_buffers_normal(original, self):
    """MHATokenToKVPool._create_buffers_normal: K/V buffers are views of the daemon's KV pool."""
    if link.active() and self.kv_cache_layout != "vectorized_5d":
        k_shape, v_shape = self._kv_buffer_shapes()
        kv = link.kv_buffers(self, tuple(k_shape), tuple(v_shape))
        if kv is not None:
            self.k_buffer, self.v_buffer = kv
            return None
    return original(self)


def set_kv_buffer(result, self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
    """MHATokenToKVPool.set_kv_buffer (AFTER): the rows just written are copied into this rank's KV
    backup (``daemon_link.kv_buffers``), which outlives the rank, so a failover keeps the KV."""
    backup = getattr(self, "_sgle_kv_backup", None)
    if backup is None:
        return None
    override = args[2] if len(args) > 2 else kwargs.get("layer_id_override")
    lid = (override if override is not None else layer.layer_id) - self.start_layer
    loc = _unwrap_write_loc()(loc_info)[0]
    k_backup, v_backup = backup
    k_backup[lid][loc] = self.k_buffer[lid][loc]
    v_backup[lid][loc] = self.v_buffer[lid][loc]
    return None


_unwrap = None


def _unwrap_write_loc():
    """SGLang's ``unwrap_write_loc``, looked up once (the hook runs at every layer of every forward)."""
    global _unwrap
    if _unwrap is None:
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        _unwrap = unwrap_write_loc
    return _unwrap
