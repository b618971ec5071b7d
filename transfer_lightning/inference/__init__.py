"""Using a trained model: predictions of new images (:mod:`.predictions`) and stand-alone exported files
(:mod:`.export`); checkpoints themselves are read by :mod:`transfer_lightning.checkpoints`."""

from transfer_lightning.inference.export import ExportedClassifier, load_classifier
from transfer_lightning.inference.predictions import PredictionsCSV

__all__ = ["ExportedClassifier", "PredictionsCSV", "load_classifier"]
