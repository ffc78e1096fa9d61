"""Patches that put weights, KV pool and prefix index in the state daemon (scheduler processes).

Every hook passes straight through unless ``SGLE_DAEMON_DIR`` is set (``--elastic-daemon``).
"""

from __future__ import annotations

from sgl_elastic.daemon import link


# -- model_executor/model_runner_components/load_model_utils.py --------------------------------------
def get_model_loader(original, load_config, *args, **kwargs):
    """Weights come from the daemon; the checkpoint is never opened by a rank."""
    if not link.active():
        return original(load_config, *args, **kwargs)
    return link.DaemonModelLoader(load_config)


# -- model_executor/pool_configurator.py -----------------------------------------------------------
def calculate_pool_sizes(original, self, available_bytes, page_size):
    """DefaultPoolConfigurator.calculate_pool_sizes: a restarted scheduler takes the size of the KV
    pool the daemon already holds (free memory differs now; the daemon refuses another geometry)."""
    if link.active():
        held = link.held_kv_tokens(page_size)
        if held:
            return self.calculate_pool_sizes_from_max_tokens(held, page_size)
    return original(self, available_bytes, page_size)


# -- mem_cache/memory_pool.py -------------------------------------------------------------------------
def create_buffers_normal(original, self):
    """MHATokenToKVPool._create_buffers_normal: K/V buffers are views of the daemon's KV pool."""
    if link.active() and self.kv_cache_layout != "vectorized_5d":
        k_shape, v_shape = self._kv_buffer_shapes()
        kv = link.kv_buffers(self, tuple(k_shape), tuple(v_shape))
        if kv is not None:
            self.k_buffer, self.v_buffer = kv
            return None
    return original(self)
