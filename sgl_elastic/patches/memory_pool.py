"""Patch of SGLang's ``mem_cache/memory_pool.py`` for the state daemon (``--elastic-daemon``).

Passes straight through unless ``SGLE_DAEMON_DIR`` was set at plugin load.
"""

from __future__ import annotations

from sgl_elastic.patches import daemon_link as link


def create_buffers_normal(original, self):
    """MHATokenToKVPool._create_buffers_normal: K/V buffers are views of the daemon's KV pool."""
    if link.active() and self.kv_cache_layout != "vectorized_5d":
        k_shape, v_shape = self._kv_buffer_shapes()
        kv = link.kv_buffers(self, tuple(k_shape), tuple(v_shape))
        if kv is not None:
            self.k_buffer, self.v_buffer = kv
            return None
    return original(self)
