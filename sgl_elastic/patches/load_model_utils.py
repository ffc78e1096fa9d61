"""Patch of SGLang's ``model_executor/model_runner_components/load_model_utils.py`` for the state daemon (``--elastic-daemon``).

Passes straight through unless ``SGLE_DAEMON_DIR`` was set at plugin load.
"""

from __future__ import annotations

from sgl_elastic.rank import daemon_link as link


def get_model_loader(original, load_config, *args, **kwargs):
    """Weights come from the daemon; the checkpoint is never opened by a rank."""
    if not link.active():
        return original(load_config, *args, **kwargs)
    return link.DaemonModelLoader(load_config)
