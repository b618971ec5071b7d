"""What ``serve`` does with one request: read its images, prepare them as ``predict`` does, and turn the model's
probabilities into the answer; a request it cannot answer becomes a :class:`Rejected` with a 4xx status."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from transfer_lightning.data.store import DECODE_ERRORS, decode_image
from transfer_lightning.data.transforms import Interpolation, Preprocessing, center_crop
from transfer_lightning.errors import UserInputError
from transfer_lightning.inference.export import ExportedClassifier, Outputs, describe, load_classifier
from transfer_lightning.network.onnx import inference_session
from transfer_lightning.tasks import Task, create_task

#: Form fields and JSON keys that carry images.
FILE_FIELDS = ("file", "files")
JSON_KEYS = ("image", "images")
#: Images one request may hold.
MAX_IMAGES_PER_REQUEST = 64


@dataclass(frozen=True)
class Rejected:
    """Why a request cannot be answered: an HTTP status and a message, for that request alone."""

    status: int
    message: str


@dataclass
class ServedModel:
    """A model to serve: uint8 images (N, 3, H, W) at ``input_size`` -> probabilities and unknown scores
    (:class:`~transfer_lightning.inference.export.Outputs`), and how to prepare them."""

    run: Callable[[Tensor], Outputs]
    stored_size: tuple[int, int]
    input_size: tuple[int, int]
    #: How photos are resized to cover ``stored_size``, as the store resized them in training.
    resize: Interpolation
    #: The model's task, which turns its probabilities into answers (with a multi-label model's thresholds).
    task: Task
    info: dict

    def prepare(self, data: bytes) -> Tensor:
        """uint8 (3, H, W) of an image file's bytes, as ``predict`` prepares it."""
        centre = self.input_size[0] if tuple(self.input_size) != tuple(self.stored_size) else None
        decoded = torch.from_numpy(decode_image(io.BytesIO(data), self.stored_size, self.resize, centre).copy())
        return center_crop(decoded[None], self.input_size[0])[0]


def load_model(ckpt_path: str | None, model_file: str | None, device: str) -> ServedModel:
    """The checkpoint's model (as ``export`` builds it), or an exported ``.pt2`` / ``.onnx`` file with its JSON."""
    if ckpt_path:
        model, preprocessing = load_classifier(ckpt_path)
        if model.hparams.channels_last:  # as training and predict run it: faster on a CPU
            model.network.to(memory_format=torch.channels_last)
        exported = ExportedClassifier.of(model, preprocessing).to(device)
        # The description export writes beside a file, so that a checkpoint and an exported file are read alike.
        description = describe(model, preprocessing, "checkpoint", ckpt_path, 0.0)
        source = Path(ckpt_path)

        @torch.inference_mode()
        def run(images: Tensor) -> Outputs:
            return Outputs.of(exported(images.to(device))).cpu()

    elif Path(model_file).is_dir():
        exported, description = load_hub_folder(Path(model_file))
        source = Path(model_file) / "model.safetensors"

        @torch.inference_mode()
        def run(images: Tensor) -> Outputs:
            return Outputs.of(exported(images.to(device))).cpu()

    else:
        source = Path(model_file)
        description_file = Path(f"{model_file}.json")
        if not source.is_file() or not description_file.is_file():
            raise UserInputError(f"--model {model_file} needs the file and {description_file} beside it (from export).")
        try:
            description = json.loads(description_file.read_text())
            if source.suffix == ".onnx":
                session = inference_session(source)  # once: a session per request would cost more than the model
            else:
                program = torch.export.load(source).module()
        except Exception as error:  # noqa: BLE001 - json, onnxruntime and torch.export fail on damaged files in many ways
            raise UserInputError(
                f"--model {model_file} (or its .json) cannot be read: cut short by a copy or a full disk, or not "
                f"written by export ({type(error).__name__}). Export the checkpoint again."
            ) from None
        if source.suffix == ".onnx":

            def run(images: Tensor) -> Outputs:
                return Outputs.of(session.run(None, {"images": images.numpy()}))

        else:

            @torch.inference_mode()
            def run(images: Tensor) -> Outputs:
                return Outputs.of(program(images))

    task = create_task(description.get("task", "multiclass"), description["classes"])
    task.load_output_description(description["output"])
    info = {
        "classes": description["classes"],
        "task": description.get("task", "multiclass"),
        "backbone": description["backbone"],
        "input": description["input"],
        "preprocessing": description["preprocessing"],
        "source": str(source),
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    return ServedModel(
        run=run,
        stored_size=tuple(description["resize_to_cover"]),
        input_size=tuple(description["center_crop"]),
        resize=description.get("resize_interpolation", "bilinear"),  # files exported before it was recorded
        task=task,
        info=info,
    )


def load_hub_folder(folder: Path) -> tuple[ExportedClassifier, dict]:
    """A folder of ``export --format hub``: timm's model from it, and a description like export's JSON."""
    from transfer_lightning.inference.hub import CONFIG_KEY, load_folder  # imports timm (the timm extra)

    try:
        config = json.loads((folder / "config.json").read_text())
        ours = config[CONFIG_KEY]
        preprocessing = Preprocessing.from_dict(ours["preprocessing"])
        network = load_folder(folder)
    except Exception as error:  # noqa: BLE001 - json, safetensors and timm fail on damaged folders in many ways
        raise UserInputError(
            f"--model {folder} is not a model folder written by export --format hub, or it is damaged "
            f"({type(error).__name__}): export the checkpoint again."
        ) from None
    task = create_task(ours["task"], list(config["label_names"]))
    task.load_output_description(ours["output"])
    height, width = preprocessing.caller_size
    description = {
        "task": ours["task"],
        "classes": list(config["label_names"]),
        "output": ours["output"],
        "backbone": f"local-dir:{folder}",
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", 3, height, width], "channels": "RGB"},
        "preprocessing": preprocessing.describe(),
        "resize_to_cover": list(preprocessing.stored_size),
        "resize_interpolation": preprocessing.resize,
        "center_crop": [height, width],
    }
    return ExportedClassifier(network, preprocessing, task).eval(), description


def read_images(request, max_bytes: int) -> list[tuple[str, bytes]] | Rejected:
    """(name, bytes) of every image of a request: multipart uploads or base64 JSON."""
    if hasattr(request, "getlist"):  # multipart form data
        uploads = [item for field in FILE_FIELDS for item in request.getlist(field)]
        if not uploads:
            fields = ", ".join(sorted(set(request.keys()))) or "none"
            return Rejected(400, f"no image: send the files in the multipart field 'file' (fields sent: {fields}).")
        images = [
            (getattr(item, "filename", None) or f"image{i}", _read_upload(item)) for i, item in enumerate(uploads)
        ]
    elif isinstance(request, dict):
        values = request.get("images", request.get("image"))
        if values is None:
            return Rejected(400, f'no image: send JSON {{"images": [BASE64, ...]}} (keys sent: {sorted(request)}).')
        values = values if isinstance(values, list) else [values]
        images = []
        for index, value in enumerate(values):
            try:
                images.append((f"image{index}", base64.b64decode(value, validate=True)))
            except (binascii.Error, TypeError, ValueError):
                return Rejected(400, f"image {index} is not base64 text.")
    else:
        return Rejected(400, "send multipart files or JSON.")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        return Rejected(413, f"{len(images)} images in one request; at most {MAX_IMAGES_PER_REQUEST}.")
    for name, data in images:
        if len(data) > max_bytes:
            return Rejected(413, f"{name} is {len(data) / 2**20:.3g} MB; at most {max_bytes / 2**20:.3g} MB per image.")
    return images


def _read_upload(item) -> bytes:
    return item.file.read() if hasattr(item, "file") else str(item).encode()


def decode_all(model: ServedModel, images: list[tuple[str, bytes]], max_pixels: int) -> list[Tensor] | Rejected:
    """The prepared images, or why one of them cannot be read (its name, and what was wrong)."""
    prepared = []
    for name, data in images:
        if not data:
            return Rejected(400, f"{name} is empty (0 bytes).")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
            if width * height > max_pixels:
                return Rejected(
                    413, f"{name} is {width}x{height} pixels; at most {max_pixels / 1e6:.3g} megapixels per image."
                )
            prepared.append(model.prepare(data))
        except UnidentifiedImageError:
            return Rejected(400, f"{name} is not an image file (JPEG, PNG, WebP, ...): PIL cannot identify it.")
        except DECODE_ERRORS as error:  # a truncated or damaged file
            return Rejected(400, f"{name} does not decode as an image ({type(error).__name__}: {error}).")
    return prepared


def answer(model: ServedModel, outputs: Outputs, names: list[str], top_k: int) -> list[dict]:
    """Per image: the predicted class and the top-k (multi-label: the labels at or above threshold too; multiclass:
    the unknown score, and ``unknown`` for an image of no known class)."""
    k = min(top_k, model.task.num_classes)
    per_image = zip(names, outputs.per_image(), strict=True)
    return [{"file": name} | model.task.answer(row, k, score) for name, (row, score) in per_image]
