"""Migration executor: runs a MigrationPlan on real tensors.

``CpuExecutor`` (shared-memory shards, threads) and ``CudaExecutor`` (device tensors, streams, pinned
staging; ``sgl_elastic.executor.cuda``, needs CUDA) share the op queues and report (``ExecReport``).
Host reloads read byte ranges of the safetensors files (``SafetensorsCheckpoint``).
"""

from sgl_elastic.executor.cpu import CpuExecutor, allocate_rank_arenas, load_rank_from_checkpoint
from sgl_elastic.executor.report import ExecReport
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.executor.shm import ArenaHandle, ShardSpec, ShmArena

__all__ = [
    "CpuExecutor",
    "ExecReport",
    "SafetensorsCheckpoint",
    "ShmArena",
    "ArenaHandle",
    "ShardSpec",
    "allocate_rank_arenas",
    "load_rank_from_checkpoint",
]
