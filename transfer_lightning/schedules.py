"""Kept so that configs written before the schedules moved to :mod:`transfer_lightning.optim` still load
(their ``class_path: transfer_lightning.schedules.WarmupCosineLR``)."""

from transfer_lightning.optim.schedules import WarmupCosineLR

__all__ = ["WarmupCosineLR"]
