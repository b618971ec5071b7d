"""``python -m transfer_lightning export``: a trained checkpoint as a stand-alone model file.

The file takes a batch of RGB ``uint8`` images ``(N, 3, H, W)`` at the trained size and returns
class probabilities ``(N, classes)`` (softmax; multi-label models: one sigmoid per class, with the
decision thresholds in the JSON) and, of a multiclass model, each image's unknown score ``(N,)`` as a second
output (above the JSON's ``output.unknown_threshold``: "none of these"); scaling, normalisation and any resize
to the network's input size happen inside. Resizing photos of any size to ``H x W`` stays with the caller,
because training decoded them with PIL's antialiased resize, which torch's ``interpolate`` matches only to a few grey
levels. ``FILE.json`` beside the model says how (and holds the class names).

Formats: ``pt2`` (``torch.export``, loaded with ``torch.export.load(FILE).module()``) and ``onnx``
(``torch.onnx`` with the ``[export]`` extra). Every export is checked: the written file and the
Lightning model must give the same probabilities (within :data:`TOLERANCE`) on a few images. An ONNX file can be
quantized to int8 (:mod:`.quantize`), checked against the float file on the run's validation split instead.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
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
#: The name of the unknown scores' output in ONNX files.
UNKNOWN_SCORE = "unknown_score"
#: Largest difference of any probability between the exported file and the Lightning model (fp32).
TOLERANCE = 1e-4


class Outputs(NamedTuple):
    """What a model gives for a batch of images: class probabilities, and each image's unknown score (``None`` from
    multi-label models, and from files exported before "none of these")."""

    probabilities: Tensor
    unknown_scores: Tensor | None = None

    @classmethod
    def of(cls, outputs: Tensor | Sequence[Tensor | np.ndarray]) -> Outputs:
        """From a model's output: probabilities alone, or (probabilities, unknown scores) as tensors or arrays."""
        if isinstance(outputs, Tensor):
            return cls(outputs)
        return cls(*(torch.as_tensor(output) for output in outputs))

    def cpu(self) -> Outputs:
        return Outputs(*(None if output is None else output.cpu() for output in self))

    def rows(self, start: int, stop: int) -> Outputs:
        """The outputs of images ``start`` to ``stop`` (excluded)."""
        return Outputs(*(None if output is None else output[start:stop] for output in self))

    def per_image(self) -> Iterator[tuple[Tensor, float | None]]:
        """Each image's probabilities and unknown score (``None`` where the model gives none)."""
        scores = self.unknown_scores.tolist() if self.unknown_scores is not None else [None] * len(self.probabilities)
        return zip(self.probabilities, scores, strict=True)


class ExportedClassifier(nn.Module):
    """uint8 RGB images ``(N, 3, H, W)`` -> class probabilities ``(N, classes)`` and, for a task that answers
    "none of these", each image's unknown score ``(N,)``, exactly as evaluation in training computes them: the
    same task's probabilities and scores and, with ``tta_flip``, its same flip average."""

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

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        size, view, interpolation = self.image_size, self.view, self.interpolation
        inputs = prepare_batch(
            images, self.mean, self.std, augment=False, image_size=size, view=view, interpolation=interpolation
        )
        logits = self.network(inputs)
        if self.tta_flip:
            logits = self.task.flip_average(logits, self.network(inputs.flip(-1)))
        probabilities = self.task.probabilities(logits)
        return (probabilities, self.task.unknown_scores(logits)) if self.task.answers_unknown else probabilities

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
        (write_onnx_classifier if format == "onnx" else _write_pt2)(exported, preprocessing, written)
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


def write_onnx_classifier(module: ExportedClassifier, preprocessing: Preprocessing, path: Path) -> None:
    """``module`` as an ONNX file: ``images`` in; ``probabilities`` and (multiclass) ``unknown_score`` out."""
    names = ["probabilities", UNKNOWN_SCORE] if module.task.answers_unknown else ["probabilities"]
    write_onnx(module, example_images(preprocessing, 2), path, "images", names)


@torch.no_grad()
def check(path: Path, format: Format, model: TransferClassifier, preprocessing: Preprocessing) -> float:
    """Largest probability difference between the file at ``path`` and ``model``; fails above :data:`TOLERANCE`
    (or when the unknown scores differ by more, relative to their size)."""
    images = example_images(preprocessing, 3, seed=1)  # another batch size than the one exported with
    logits = model.evaluation_logits(preprocessing(images))
    expected = Outputs(model.task.probabilities(logits), model.task.unknown_scores(logits))
    return compare_outputs(run_exported(path, format, images), expected, f"The exported {format} model")


def compare_outputs(got: Outputs, expected: Outputs, what: str) -> float:
    """Largest difference between ``what``'s probabilities and the checkpoint's; above :data:`TOLERANCE` an error,
    as is a difference of the unknown scores above :data:`TOLERANCE` times their size."""
    difference = float((got.probabilities - expected.probabilities).abs().max())
    problem = None
    if got.probabilities.shape != expected.probabilities.shape or not difference <= TOLERANCE:
        problem = f"probabilities differ by up to {difference:.2e} (allowed {TOLERANCE:.0e})"
    elif (got.unknown_scores is None) != (expected.unknown_scores is None):
        problem = "one gives unknown scores and the other does not"
    elif expected.unknown_scores is not None:
        scale = max(1.0, float(expected.unknown_scores.abs().max()))
        score_difference = float((got.unknown_scores - expected.unknown_scores).abs().max())
        if not score_difference <= TOLERANCE * scale:
            problem = f"unknown scores differ by up to {score_difference:.2e} (allowed {TOLERANCE * scale:.1e})"
    if problem:
        raise UserInputError(
            f"{what} does not match the checkpoint: {problem}. This is a bug: please report it with the backbone name."
        )
    return difference


def run_exported(path: Path, format: Format, images: Tensor) -> Outputs:
    """The outputs of the exported model at ``path`` for uint8 ``images``, run as a user would run it."""
    if format == "pt2":
        with torch.inference_mode():
            return Outputs.of(torch.export.load(path).module()(images))
    return Outputs.of(inference_session(path).run(None, {"images": images.numpy()}))


def describe(
    model: TransferClassifier, preprocessing: Preprocessing, format: Format, ckpt_path: str | Path, difference: float
) -> dict:
    """What ``FILE.json`` says: the classes, the input and output, and what the caller must do first."""
    height, width = preprocessing.caller_size
    output = {"name": "probabilities", "dtype": "float32", "shape": ["N", len(model.class_names)]}
    output |= model.task.describe_output()
    outputs = {"output": output}
    if model.task.answers_unknown:
        outputs["unknown_score"] = {
            "name": UNKNOWN_SCORE,
            "dtype": "float32",
            "shape": ["N"],
            "rule": 'the second output: above output.unknown_threshold, the image is of no known class ("unknown")',
        }
    return {
        "format": format,
        "task": model.task.name,
        "classes": model.class_names,
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", 3, height, width], "channels": "RGB"},
        **outputs,
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
