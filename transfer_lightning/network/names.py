"""Backbone names from the config, resolved once into which library builds the network and from what.

``resnet18``, ``mobilenet_v2``, ...: torchvision's classification models. ``timm/NAME[.TAG]``
(``timm/convnext_tiny.fb_in22k``): a timm model by name and pretrained tag. ``hf-hub:ORG/NAME[@REVISION]``:
a timm model folder on the Hugging Face Hub. ``local-dir:PATH``: such a folder on disk (``config.json``
and ``model.safetensors``). Like torchvision's ``get_model``, a bad name fails here, in one line.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torchvision

from transfer_lightning.errors import UserInputError

TIMM_PREFIX, HUB_PREFIX, LOCAL_PREFIX = "timm/", "hf-hub:", "local-dir:"
TIMM_MISSING = "timm backbones need the timm extra: pip install -e '.[timm]'."


@dataclass(frozen=True)
class BackboneName:
    """A parsed backbone name.

    Attributes:
        library: ``torchvision`` or ``timm``.
        model: What that library's factory takes: torchvision's model name, or timm's ``create_model``
            name (``convnext_tiny.fb_in22k``, ``hf-hub:ORG/NAME@REV``, ``local-dir:/absolute/path``).
    """

    library: Literal["torchvision", "timm"]
    model: str


def parse_backbone(name: str) -> BackboneName:
    """``name`` as a :class:`BackboneName`; an unknown name, a missing folder or a missing timm is one line."""
    if name.startswith((TIMM_PREFIX, HUB_PREFIX, LOCAL_PREFIX)):
        if importlib.util.find_spec("timm") is None:
            raise UserInputError(f"Backbone {name!r}: {TIMM_MISSING}")
        if name.startswith(TIMM_PREFIX):
            return BackboneName("timm", _checked_timm_name(name[len(TIMM_PREFIX) :]))
        if name.startswith(LOCAL_PREFIX):
            return BackboneName("timm", LOCAL_PREFIX + str(_checked_model_folder(name[len(LOCAL_PREFIX) :])))
        if name.count("/") != 1 or not all(name[len(HUB_PREFIX) :].split("@")[0].split("/")):
            raise UserInputError(f"Backbone {name!r}: a Hub model is hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION.")
        return BackboneName("timm", name)
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserInputError(
            f"Unknown backbone {name!r}: not a torchvision classification model.{hint} timm's models are named "
            "timm/NAME (e.g. timm/convnext_tiny.fb_in22k); list them with: python -m transfer_lightning backbones."
        )
    return BackboneName("torchvision", name)


def _checked_timm_name(model: str) -> str:
    import timm

    architecture = model.split(".")[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserInputError(
            f"Unknown timm model {architecture!r}.{hint} "
            "List them with: python -m transfer_lightning backbones --filter NAME."
        )
    return model


def _checked_model_folder(path: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise UserInputError(
            f"local-dir:{path} is not a model folder in the Hub's layout: {folder / 'config.json'} is missing "
            "(a timm folder holds config.json and model.safetensors, as timm's save_for_hf and "
            "transfer_lightning export --format hub write them)."
        )
    return folder
