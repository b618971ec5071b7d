"""What runs around ``fit`` besides the model: the frozen-feature cache (:mod:`.feature_cache`), weight averaging
(:mod:`.averaging`), training speed (:mod:`.speed`), a checkpoint on interrupt (:mod:`.interrupt`) and what
TensorBoard shows (:mod:`.dashboards`)."""

from transfer_lightning.training.averaging import WeightEMA
from transfer_lightning.training.best_checkpoint import TaskCheckpoint
from transfer_lightning.training.checkpoint_io import AtomicCheckpointIO
from transfer_lightning.training.dashboards import DashboardLayout, HparamsWithResults
from transfer_lightning.training.feature_cache import FrozenFeatureCache
from transfer_lightning.training.interrupt import CheckpointOnInterrupt
from transfer_lightning.training.speed import TrainingSpeed

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointOnInterrupt",
    "DashboardLayout",
    "FrozenFeatureCache",
    "HparamsWithResults",
    "TaskCheckpoint",
    "TrainingSpeed",
    "WeightEMA",
]
