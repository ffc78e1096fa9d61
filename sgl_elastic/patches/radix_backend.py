"""Radix-cache backend of SGLang's ``mem_cache/registry.py`` for the state daemon (``--elastic-daemon``).

``DaemonRadixCache``: SGLang's classic ``RadixCache`` mirrored into the daemon's prefix index.

Registered as the radix-cache backend ``sgl-elastic-daemon`` (SGLang's own extension point,
``mem_cache/registry.py``); ``launch_server --elastic-daemon`` selects it. What it adds:

- start: the tree is rebuilt from the daemon's index and those KV slots leave the allocator's
  free list (every rank does the same from the same index, before serving);
- rank 0 mirrors every insert, and every evicted leaf is forgotten by the daemon *before* its
  slots can be reused (a synchronous round trip), so the index never maps tokens to other KV;
- ``reset`` (flush_cache) clears the daemon's index.
"""

from __future__ import annotations

from array import array

BACKEND = "sgl-elastic-daemon"


def _plain(key) -> bool:
    return key.extra_key is None and key.cache_salt is None and not key.is_bigram


def make_class():
    from sglang.srt.mem_cache.radix_cache import RadixCache

    from sgl_elastic.rank import daemon_link as link

    class DaemonRadixCache(RadixCache):
        def __init__(self, params) -> None:
            self._sgle_ready = False
            super().__init__(params)
            if not self.disable and link.active():
                link.restore_prefixes(self)
            self._sgle_ready = link.active()

        def insert(self, params):
            out = super().insert(params)
            if self._sgle_ready and not self.disable and params.value is not None and _plain(params.key):
                key = params.key.page_aligned(self.page_size)
                n = len(key)
                if n:
                    link.mirror().insert(array("q", key.token_ids[:n]).tolist(), params.value[:n].tolist())
            return out

        def _delete_leaf(self, node):
            if self._sgle_ready and len(node.value):
                link.mirror().forget(node.value.tolist())
            return super()._delete_leaf(node)

        def reset(self):
            super().reset()
            if self._sgle_ready:
                link.mirror().clear()

    return DaemonRadixCache


def factory(ctx):
    """``register_radix_cache_backend`` factory: the mirrored classic tree (SGLang's default chain
    when the radix cache is disabled)."""
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    if ctx.disable_radix_cache or ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        return default_radix_cache_factory(ctx)
    return make_class()(ctx.params)


def register() -> None:
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    if get_radix_cache_factory(BACKEND) is None:
        register_radix_cache_backend(BACKEND, factory)
