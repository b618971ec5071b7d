"""How the parameters are fitted: the optimizer's parameter groups and the schedule's length
(:mod:`.groups`), learning-rate schedules (:mod:`.schedules`), and the L-BFGS linear probe
(:mod:`.linear_probe`)."""

from transfer_lightning.optim.groups import build_optimizer, build_scheduler, optimization, parameter_groups
from transfer_lightning.optim.linear_probe import LBFGSHead
from transfer_lightning.optim.schedules import WarmupCosineLR

__all__ = ["LBFGSHead", "WarmupCosineLR", "build_optimizer", "build_scheduler", "optimization", "parameter_groups"]
