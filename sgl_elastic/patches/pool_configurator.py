"""Patch of SGLang's ``model_executor/pool_configurator.py`` for the state daemon (``--elastic-daemon``).

Passes straight through unless ``SGLE_DAEMON_DIR`` was set at plugin load.
"""

from __future__ import annotations

from sgl_elastic.patches import daemon_link as link


def calculate_pool_sizes(original, self, available_bytes, page_size):
    """DefaultPoolConfigurator.calculate_pool_sizes: a restarted scheduler takes the size of the KV
    pool the daemon already holds (free memory differs now; the daemon refuses another geometry)."""
    if link.active():
        held = link.held_kv_tokens(page_size)
        if held:
            return self.calculate_pool_sizes_from_max_tokens(held, page_size)
    return original(self, available_bytes, page_size)
