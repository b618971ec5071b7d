"""Where a model fails and where it looks: Grad-CAM (:mod:`.cam`), pictures (:mod:`.pictures`), and the
callback that draws them after ``test`` and at the start of ``fit`` (:mod:`.callback`)."""

from transfer_lightning.interpretation.callback import Interpretation, most_confused, top_losses

__all__ = ["Interpretation", "most_confused", "top_losses"]
