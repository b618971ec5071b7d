"""``python -m transfer_lightning export``: a trained checkpoint as a stand-alone model file.

The file takes a batch of RGB ``uint8`` images ``(N, 3, H, W)`` at the trained size and returns
class probabilities ``(N, classes)`` (softmax; multi-label models: one sigmoid per class, with the
decision thresholds in the JSON); scaling, normalisation and any resize to the network's input
size happen inside. Resizing photos of any size to ``H x W`` stays with the caller, because training
decoded them with PIL's antialiased resize, which torch's ``interpolate`` matches only to a few grey
levels. ``FILE.json`` beside the model says how (and holds the class names).

Formats: ``pt2`` (``torch.export``, loaded with ``torch.export.load(FILE).module()``) and ``onnx``
(``torch.onnx`` with the ``[export]`` extra). Every export is checked: the written file and the
Lightning model must give the same probabilities (within :data:`TOLERANCE`) on a few images. An ONNX file can be
quantized to int8 (:mod:`.quantize`), checked against the float file on the run's validation split instead.
"""

from __future__ import annotations

import io
import json
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from transfer_lightning import checkpoints
from transfer_lightning.data.transforms import Preprocessing, prepare_batch
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path
from transfer_lightning.inference.quantize import QuantizeSettings, quantize_checked
from transfer_lightning.inference.run_images import open_run_images
from transfer_lightning.model import TransferClassifier
from transfer_lightning.network.onnx import dynamic_batch, inference_session, missing_onnx_packages, write_onnx
from transfer_lightning.tasks import Task

Format = Literal["onnx", "pt2"]
FORMATS: tuple[Format, ...] = ("onnx", "pt2")
#: Largest difference of any probability between the exported file and the Lightning model (fp32).
TOLERANCE = 1e-4


class ExportedClassifier(nn.Module):
    """uint8 RGB images ``(N, 3, H, W)`` -> class probabilities ``(N, classes)``, exactly as evaluation in
    training computes them: the same task's probabilities and, with ``tta_flip``, its same flip average."""

    def __init__(self, network: nn.Module, preprocessing: Preprocessing, task: Task, tta_flip: bool = False) -> None:
        super().__init__()
        self.network, self.task, self.tta_flip = network, task, tta_flip
        self.image_size, self.view, self.interpolation = (
            preprocessing.image_size,
            preprocessing.view,
            preprocessing.interpolation,
        )
        self.register_buffer("mean", torch.tensor(preprocessing.mean))
        self.register_buffer("std", torch.tensor(preprocessing.std))

    def forward(self, images: Tensor) -> Tensor:
        size, view, interpolation = self.image_size, self.view, self.interpolation
        inputs = prepare_batch(
            images, self.mean, self.std, augment=False, image_size=size, view=view, interpolation=interpolation
        )
        logits = self.network(inputs)
        if self.tta_flip:
            logits = self.task.flip_average(logits, self.network(inputs.flip(-1)))
        return self.task.probabilities(logits)

    @classmethod
    def of(cls, model: TransferClassifier, preprocessing: Preprocessing) -> ExportedClassifier:
        """The exported form of a trained model."""
        return cls(model.network, preprocessing, model.task, model.hparams.tta_flip)


def load_classifier(ckpt_path: str | Path) -> tuple[TransferClassifier, Preprocessing]:
    """The checkpoint's model (CPU, eval mode) and how its images were prepared."""
    checkpoint = checkpoints.read_checkpoint(ckpt_path)
    preprocessing = checkpoints.preprocessing(checkpoint, ckpt_path)
    # Lightning's loader, with this version's reading of the hyperparameters and no pretrained weights to fetch.
    hparams = checkpoints.model_hparams(checkpoint) | {"weights": None, "compile": False}
    model = TransferClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", **hparams)
    return model.eval(), preprocessing


def export(
    ckpt_path: str | Path,
    output: str | Path,
    format: Format | None = None,
    int8: QuantizeSettings | None = None,
    data_dir: str | None = None,
) -> Path:
    """Write the model of ``ckpt_path`` to ``output`` (and ``output.json``), checked; returns ``output``.

    ``format`` defaults to the suffix of ``output``. With ``int8`` (ONNX only), the file is quantized on the run's
    own images (in ``data_dir`` when they moved). Nothing is left at ``output`` when a check fails.
    """
    output = Path(output)
    format = format or output.suffix.lstrip(".")
    if format not in FORMATS:
        raise UserInputError(f"Unknown export format {format!r}: use --format onnx or --format pt2.")
    if int8 is not None and format != "onnx":
        raise UserInputError(f"--quantize int8 makes ONNX files only: use --format onnx, not {format}.")
    if format == "onnx":
        missing = missing_onnx_packages()
        if missing:
            raise UserInputError(
                f"ONNX export needs {', '.join(missing)}: install the export extra (pip install -e '.[export]')."
            )
    model, preprocessing = load_classifier(ckpt_path)
    if int8 is not None:  # read before anything is written, so that missing data fails first
        run_images = open_run_images(checkpoints.read_checkpoint(ckpt_path), preprocessing, data_dir=data_dir)
    exported = ExportedClassifier.of(model, preprocessing).eval()
    with atomic_path(output) as written, atomic_path(f"{output}.json") as json_file:  # both, or neither
        (_write_onnx if format == "onnx" else _write_pt2)(exported, preprocessing, written)
        difference = check(written, format, model, preprocessing)
        description = describe(model, preprocessing, format, ckpt_path, difference)
        if int8 is not None:
            description["quantization"] = quantize_checked(written, written, run_images, model.task, int8)
        json_file.write_text(json.dumps(description, indent=1) + "\n")
    return output


def example_images(preprocessing: Preprocessing, count: int, seed: int = 0) -> Tensor:
    """``count`` random uint8 images of the size an exported model takes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, *preprocessing.caller_size), dtype=torch.uint8, generator=generator)


def _write_pt2(module: ExportedClassifier, preprocessing: Preprocessing, path: Path) -> None:
    program = torch.export.export(module, (example_images(preprocessing, 2),), dynamic_shapes=dynamic_batch())
    buffer = io.BytesIO()  # written from Python: torch's own writer reports a full disk as a RuntimeError
    torch.export.save(program, buffer)
    path.write_bytes(buffer.getbuffer())


def _write_onnx(module: ExportedClassifier, preprocessing: Preprocessing, path: Path) -> None:
    write_onnx(module, example_images(preprocessing, 2), path, "images", "probabilities")


@torch.no_grad()
def check(path: Path, format: Format, model: TransferClassifier, preprocessing: Preprocessing) -> float:
    """Largest probability difference between the file at ``path`` and ``model``; fails above :data:`TOLERANCE`."""
    images = example_images(preprocessing, 3, seed=1)  # another batch size than the one exported with
    expected = model.task.probabilities(model.evaluation_logits(preprocessing(images)))
    return compare_probabilities(run_exported(path, format, images), expected, f"The exported {format} model")


def compare_probabilities(got: Tensor, expected: Tensor, what: str) -> float:
    """Largest difference between ``what``'s probabilities and the checkpoint's; above :data:`TOLERANCE` an error."""
    difference = float((got - expected).abs().max())
    if got.shape != expected.shape or not difference <= TOLERANCE:
        raise UserInputError(
            f"{what} does not match the checkpoint: probabilities differ by up to {difference:.2e} "
            f"(allowed {TOLERANCE:.0e}). This is a bug: please report it with the backbone name."
        )
    return difference


def run_exported(path: Path, format: Format, images: Tensor) -> Tensor:
    """Probabilities of the exported model at ``path`` for uint8 ``images``, run as a user would run it."""
    if format == "pt2":
        with torch.inference_mode():
            return torch.export.load(path).module()(images)
    session = inference_session(path)
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def describe(
    model: TransferClassifier, preprocessing: Preprocessing, format: Format, ckpt_path: str | Path, difference: float
) -> dict:
    """What ``FILE.json`` says: the classes, the input and output, and what the caller must do first."""
    height, width = preprocessing.caller_size
    output = {"name": "probabilities", "dtype": "float32", "shape": ["N", len(model.class_names)]}
    output |= model.task.describe_output()
    return {
        "format": format,
        "task": model.task.name,
        "classes": model.class_names,
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", 3, height, width], "channels": "RGB"},
        "output": output,
        "preprocessing": preprocessing.describe(),
        "exif_orientation": "apply before resizing: PIL.ImageOps.exif_transpose(image), as training and predict do",
        "resize_to_cover": list(preprocessing.stored_size),
        "resize_interpolation": preprocessing.resize,
        "center_crop": [height, width],
        "inside_the_model": {
            "scale": "divide by 255",
            "mean": list(preprocessing.mean),
            "std": list(preprocessing.std),
            "network_input_size": preprocessing.image_size or list(preprocessing.stored_size),
            "interpolation": preprocessing.interpolation,
        },
        "backbone": model.hparams.backbone,
        "checkpoint": str(ckpt_path),
        "checked": {"images": 3, "max_probability_difference": difference, "tolerance": TOLERANCE},
        "transfer_lightning_version": version("transfer_lightning"),
    }
