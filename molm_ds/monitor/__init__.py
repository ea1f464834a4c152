"""TensorBoard monitoring of expert load and training health (see docs/monitoring.md).

The trainer builds one `TrainingMonitor` and calls `on_step(step, metrics)` on every rank after each
optimizer step. Lower-level pieces: `ExpertLoadTracker` (hooks on the MoE sub-layers, additive
`LoadSums`, one SUM all-reduce), `load_stats` (statistics from reduced sums), `reduce_metrics`
(cross-rank reduction with a declared `ReduceOp` per metric).
"""

from molm_ds.monitor.config import PEAK_FLOPS, MonitorConfig
from molm_ds.monitor.expert_load import ExpertLoadTracker, SubLayer
from molm_ds.monitor.monitor import DEFAULT_OPS, TrainingMonitor, mfu, scalar_tag
from molm_ds.parallel.comm import ReduceOp, reduce_metrics
from molm_ds.monitor.stats import ROUTER_STAT_NAMES, STAT_NAMES, LoadSums, RouterUnitSums, load_stats, router_unit_stats

__all__ = [
    "DEFAULT_OPS", "ExpertLoadTracker", "LoadSums", "MonitorConfig", "PEAK_FLOPS", "ReduceOp", "STAT_NAMES",
    "SubLayer", "TrainingMonitor", "load_stats", "mfu", "reduce_metrics", "scalar_tag",
    "ROUTER_STAT_NAMES", "RouterUnitSums", "router_unit_stats",
]
