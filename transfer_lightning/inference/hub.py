"""``export --format hub``: a checkpoint of a timm backbone as a model folder in the Hugging Face Hub's layout.

The folder holds ``model.safetensors`` and ``config.json`` written by timm's own ``save_for_hf`` (the
architecture, ``num_classes``, ``label_names`` and a ``pretrained_cfg`` with the preprocessing used in
training), and a ``README.md`` model card. It loads with ``timm.create_model("local-dir:DIR",
pretrained=True)``, which is checked before the folder appears; ``serve --model DIR`` serves it.
Uploading is the Hub's own CLI: ``hf upload ORG/NAME DIR``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_lightning.data.transforms import Preprocessing
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import remove_leftovers, temporary_path
from transfer_lightning.inference.export import Outputs, compare_outputs, example_images, load_classifier
from transfer_lightning.model import TransferClassifier
from transfer_lightning.network.names import HUB_PREFIX, LOCAL_PREFIX, TIMM_PREFIX
from transfer_lightning.network.timm_backbones import TimmNetwork
from transfer_lightning.tasks import MulticlassTask, Task

#: Our own key in config.json: what timm's config has no field for (the task, the caller's resize).
CONFIG_KEY = "transfer_lightning"


def timm_classifier(network: TimmNetwork) -> nn.Module:
    """timm's own model with the trained head as its classifier (a copy: the network is left as it is)."""
    if not isinstance(network.head, nn.Linear):
        raise UserInputError(
            "timm's own model has one Linear layer on its last pooled features as its classifier, and this one was "
            "trained with model.head mlp or model.stage_features: export it with --format onnx or pt2 (they hold any "
            "head), or train it with model.head linear and no stage features."
        )
    model = copy.deepcopy(network.body)
    model.reset_classifier(network.head.out_features)
    model.get_classifier().load_state_dict(network.head.state_dict())
    return model.eval()


def data_config(preprocessing: Preprocessing) -> dict[str, Any]:
    """timm's data config of the preprocessing used in training: the input side, and the crop fraction
    of the stored size (1.0 where whole images were resized, as CIFAR-10's 32 px ones)."""
    side = preprocessing.image_size or min(preprocessing.stored_size)
    crop = side / min(preprocessing.stored_size) if preprocessing.view == "crop" else 1.0
    while math.floor(side / crop) < min(preprocessing.stored_size):  # timm resizes to floor(side / crop_pct)
        crop = math.nextafter(crop, 0.0)
    return {
        "input_size": (3, side, side),
        # timm resizes the photo with it: as the store did (crop view), or as the network's input was (whole images).
        "interpolation": preprocessing.resize if preprocessing.view == "crop" else preprocessing.interpolation,
        "mean": tuple(preprocessing.mean),
        "std": tuple(preprocessing.std),
        "crop_pct": crop,
        "crop_mode": "center",
    }


def export_hub(ckpt_path: str | Path, output: str | Path) -> Path:
    """Write the checkpoint's model as a Hub folder ``output`` (which must not hold files), checked; returns it."""
    from timm.models import save_for_hf

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserInputError(f"--output {output} exists and is not an empty folder: name a new folder for the model.")
    model, preprocessing = load_classifier(ckpt_path)
    if not isinstance(model.network, TimmNetwork):
        raise UserInputError(
            f"--format hub writes timm's layout; {model.hparams.backbone} is a torchvision backbone: "
            "export it with --format onnx or pt2, or train a timm backbone (timm/NAME)."
        )
    classifier = timm_classifier(model.network)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output.parent)
    partial = temporary_path(output)
    try:
        extras = {
            "task": model.task.name,
            "preprocessing": preprocessing.to_dict(),
            "output": model.task.describe_output(),
        }
        config = {"label_names": list(model.class_names), CONFIG_KEY: extras}
        save_for_hf(
            classifier,
            str(partial),
            model_config=config,
            safe_serialization=True,
            data_config=data_config(preprocessing),
        )
        _restore_own_key(partial / "config.json", extras)
        difference = check_folder(partial, model, preprocessing)
        card = model_card(model, preprocessing, Path(ckpt_path), difference)
        (partial / "README.md").write_text(card, encoding="utf-8")
        for written in partial.iterdir():  # safetensors writes its file for the owner alone: share it as the rest
            written.chmod(0o644)
        if output.exists():
            output.rmdir()
        partial.rename(output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return output


def _restore_own_key(config_path: Path, extras: dict[str, Any]) -> None:
    """timm keeps unknown top-level keys of ``model_config``; make sure ours is there whatever it does."""
    config = json.loads(config_path.read_text())
    config[CONFIG_KEY] = extras
    config_path.write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def load_folder(folder: Path) -> nn.Module:
    """The folder's model as a timm user loads it."""
    import timm

    return timm.create_model(f"{LOCAL_PREFIX}{folder}", pretrained=True).eval()


@torch.no_grad()
def check_folder(folder: Path, model: TransferClassifier, preprocessing: Preprocessing) -> float:
    """Largest probability difference between timm's model from ``folder`` and the checkpoint (one pass, no flip);
    their unknown scores are compared too."""
    images = preprocessing(example_images(preprocessing, 3, seed=1))
    expected, got = model.logits(images), load_folder(folder)(images)
    task = model.task
    outputs = [Outputs(task.probabilities(logits), task.unknown_scores(logits)) for logits in (got, expected)]
    return compare_outputs(*outputs, "The Hub folder")


def base_model(backbone: str, network: TimmNetwork) -> str | None:
    """The Hub id of the pretrained weights the model was fine-tuned from, when it has one."""
    if backbone.startswith(HUB_PREFIX):
        return backbone[len(HUB_PREFIX) :].split("@")[0]
    hub_id = network.body.pretrained_cfg.get("hf_hub_id")
    if hub_id:
        return hub_id.split("@")[0]
    if backbone.startswith(TIMM_PREFIX):
        return backbone
    return None


def model_card(model: TransferClassifier, preprocessing: Preprocessing, ckpt_path: Path, difference: float) -> str:
    """README.md: the Hub's metadata block, then what the model is, its test scores, how it was trained and used."""
    network: TimmNetwork = model.network
    run_dir = ckpt_path.resolve().parent.parent  # lightning_logs/version_N/checkpoints/x.ckpt
    metadata = {
        "library_name": "timm",
        "tags": ["image-classification", "timm", "transfer_lightning", model.task.name],
        "license": network.body.pretrained_cfg.get("license"),
        "base_model": base_model(model.hparams.backbone, network),
        "pipeline_tag": "image-classification",
    }
    lines = ["---"] + [_yaml(key, value) for key, value in metadata.items() if value] + ["---", ""]
    architecture = network.body.pretrained_cfg.get("architecture", "?")
    lines += [
        f"# {architecture} fine-tuned with transfer_lightning",
        "",
        f"A {model.task.name} image classifier over {len(model.class_names)} classes "
        f"({', '.join(model.class_names[:20])}{', ...' if len(model.class_names) > 20 else ''}), "
        f"from the backbone `{model.hparams.backbone}` "
        f"({'frozen, head trained' if model.hparams.freeze_backbone else 'fine-tuned'}).",
        "",
        "## Use",
        "",
        "```python",
        "import timm, torch",
        'model = timm.create_model("hf-hub:ORG/NAME", pretrained=True).eval()   # or "local-dir:PATH"',
        "config = timm.data.resolve_model_data_config(model)",
        "transform = timm.data.create_transform(**config)",
        *(
            usage_lines(model.task)
            if model.task.single_label
            else ["probabilities = model(transform(image)[None]).sigmoid()"]
        ),
        "```",
        "",
        f"Preprocessing used in training (in `config.json`): {preprocessing.describe()} "
        f"Then the network's input: {data_config(preprocessing)['input_size'][1]} px, mean {list(preprocessing.mean)}, "
        f"std {list(preprocessing.std)}.",
    ]
    if model.hparams.tta_flip:
        lines += ["", "Evaluated with flip test-time augmentation; the model here is one pass (average it yourself)."]
    report = run_dir / "classification_report.md"
    lines += ["", "## Test scores", ""]
    if report.is_file():  # its headings one level down, under this section's
        lines += [f"##{line}" if line.startswith("#") else line for line in report.read_text().strip().splitlines()]
    else:
        lines += ["Not tested: the run has no classification_report.md."]
    config = run_dir / "config.yaml"
    lines += ["", "## Training", ""]
    if config.is_file():
        lines += ["`python -m transfer_lightning fit --config config.yaml` with this config:", "", "```yaml"]
        lines += [config.read_text().strip(), "```"]
    else:
        lines += [f"From checkpoint `{ckpt_path.name}`; the run's config.yaml was not found beside it."]
    lines += [
        "",
        f"Exported by transfer_lightning {version('transfer_lightning')} with timm {version('timm')}; "
        f"checked: timm's model from this folder gives the checkpoint's probabilities within {difference:.1e}.",
        "",
    ]
    return "\n".join(lines)


def usage_lines(task: Task) -> list[str]:
    """The model card's lines that turn the model's logits into probabilities: a multiclass model's calibrated, and
    when a threshold was chosen, "none of these"."""
    if not isinstance(task, MulticlassTask):
        return ["probabilities = model(transform(image)[None]).sigmoid()"]
    lines = [
        "logits = model(transform(image)[None])",
        f"temperature = {float(task.temperature):.6g}  # config.json: {CONFIG_KEY}.output.temperature",
        "probabilities = (logits / temperature).softmax(-1)  # calibrated",
    ]
    threshold = float(task.unknown_threshold)
    if not task.has_unknown_threshold:
        return [*lines, "# no threshold of unknown_score was chosen: every image is given a known class"]
    return [
        *lines,
        f"unknown_threshold = {threshold:.6g}  # config.json: {CONFIG_KEY}.output.unknown_threshold",
        "unknown = -logits.logsumexp(-1) > unknown_threshold  # of no known class: answer none of these",
    ]


def _yaml(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{key}:\n" + "\n".join(f"- {item}" for item in value)
    return f"{key}: {value}"
