"""State daemon: a process per node that owns the ranks' weight shards and KV pools and outlives
inference processes (CPU: shared memory; CUDA: IPC handles keyed by GPU UUID).

Small public API; the rest is reached by submodule (``protocol``, ``server``, ``kv_index``, ...).
Importing this package needs neither torch nor CUDA.
"""

from sgl_elastic.daemon.client import DaemonClient, DaemonError, DaemonUnavailable
from sgl_elastic.daemon.launch import DaemonProcess
from sgl_elastic.daemon.state import DaemonState

__all__ = ["DaemonClient", "DaemonError", "DaemonUnavailable", "DaemonProcess", "DaemonState"]
