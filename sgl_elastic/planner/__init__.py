"""CMM planner: ``plan_migration(old_layout, change, topology) -> MigrationPlan``; pure, no devices.

The cost model (``predict_time``) and the exhaustive reference solver (``planner.exact``) live here too.
"""

from sgl_elastic.planner.cmm import plan_migration
from sgl_elastic.planner.cost import CostEstimate, predict_time
from sgl_elastic.planner.plan import HOST, KEEP, PEER, RELOAD, ClusterChange, CopyOp, FamilyOp, MigrationPlan
from sgl_elastic.planner.topology import Topology

__all__ = [
    "plan_migration",
    "predict_time",
    "CostEstimate",
    "ClusterChange",
    "MigrationPlan",
    "FamilyOp",
    "CopyOp",
    "Topology",
    "HOST",
    "KEEP",
    "PEER",
    "RELOAD",
]
