"""``python -m transfer_lightning backbones [--filter PATTERN]``: the backbone names ``--model.backbone`` takes,
torchvision's and timm's pretrained ones, each marked when its weights are already on this machine."""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
from pathlib import Path

import torch
import torchvision

from transfer_lightning.errors import UserInputError
from transfer_lightning.network.names import TIMM_MISSING, TIMM_PREFIX


def torchvision_rows(pattern: str) -> list[tuple[str, bool]]:
    """(name, DEFAULT weights in torch's hub cache) of torchvision's classification models matching ``pattern``."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    rows = []
    for name in torchvision.models.list_models(module=torchvision.models):
        if fnmatch.fnmatch(name, pattern):
            default = getattr(torchvision.models.get_model_weights(name), "DEFAULT", None)
            rows.append((name, default is not None and (checkpoints / Path(default.url).name).is_file()))
    return rows


def timm_rows(pattern: str) -> list[tuple[str, bool]]:
    """(``timm/NAME.TAG``, weights in the Hugging Face Hub cache) of timm's pretrained models matching ``pattern``."""
    import timm
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:  # the cache downloads use ($HF_HUB_CACHE, or $HF_HOME/hub), read where downloads read it
        cached = {repo.repo_id for repo in scan_cache_dir(constants.HF_HUB_CACHE).repos if repo.repo_type == "model"}
    except CacheNotFound:
        cached = set()
    rows = []
    for name in timm.list_models(pattern, pretrained=True):
        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
        rows.append((TIMM_PREFIX + name, hub_id is not None and hub_id.split("@")[0] in cached))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m transfer_lightning backbones",
        description="List the names --model.backbone takes (with pretrained weights); 'cached' marks those "
        "whose weights are on this machine already (torch's hub cache, the Hugging Face Hub cache), which "
        "work offline. Folders in the Hub's layout are named local-dir:PATH, Hub models hf-hub:ORG/NAME.",
    )
    parser.add_argument("--filter", default="*", help="shell-style pattern, e.g. 'convnext*' or '*dinov2*'")
    parser.add_argument("--library", choices=("all", "torchvision", "timm"), default="all")
    parser.add_argument("--cached", action="store_true", help="only those whose weights are on this machine")
    args = parser.parse_args(argv)
    rows = torchvision_rows(args.filter) if args.library in ("all", "torchvision") else []
    if args.library in ("all", "timm"):
        if importlib.util.find_spec("timm") is None:
            if args.library == "timm":
                raise UserInputError(TIMM_MISSING)
            print(f"(timm's models are not listed: {TIMM_MISSING})")
        else:
            rows += timm_rows(args.filter)
    shown = [(name, cached) for name, cached in rows if cached or not args.cached]
    if not shown:
        raise UserInputError(f"No backbone matches {args.filter!r}{' with cached weights' if args.cached else ''}.")
    width = max(len(name) for name, _ in shown)
    for name, cached in shown:
        print(f"{name:<{width}}  {'cached' if cached else ''}".rstrip())
    print(f"{len(shown)} backbones, {sum(cached for _, cached in shown)} with weights on this machine.")
