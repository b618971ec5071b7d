"""``python -m transfer_lightning serve``: a trained model behind HTTP, on LitServe.

``POST /predict`` takes one or several images (multipart fields ``file`` / ``files``, or JSON
``{"image": BASE64}`` / ``{"images": [BASE64, ...]}``) and answers, per image and in the order sent,
the predicted class and the top-k ``[{"class", "probability"}]``. ``GET /health`` is 200 once the
model is loaded (503 before), ``GET /info`` describes the model, ``GET /`` is a page to try it.

Images are prepared exactly as ``predict`` prepares them: decoded by PIL, turned upright by their
EXIF orientation, converted to RGB, resized to cover the checkpoint's stored size and centre-cropped
(:func:`~transfer_lightning.data.store.decode_image`), so the server and ``predict`` agree on a file.
Requests are batched by LitServe (``max_batch_size``, ``batch_timeout``). A bad upload is answered
with a 4xx JSON message for that request alone, and the server goes on serving.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import importlib.util
import io
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from transfer_lightning.data.store import DECODE_ERRORS, decode_image
from transfer_lightning.data.transforms import center_crop
from transfer_lightning.errors import UserInputError

#: Form fields and JSON keys that carry images.
FILE_FIELDS = ("file", "files")
JSON_KEYS = ("image", "images")
#: Images one request may hold.
MAX_IMAGES_PER_REQUEST = 64
PAGE = Path(__file__).resolve().parent / "static" / "index.html"


@dataclass(frozen=True)
class Rejected:
    """Why a request cannot be answered: an HTTP status and a message, for that request alone."""

    status: int
    message: str


@dataclass
class ServedModel:
    """A model to serve: uint8 images (N, 3, H, W) at ``input_size`` -> probabilities, and how to prepare them."""

    run: Callable[[Tensor], Tensor]
    stored_size: tuple[int, int]
    input_size: tuple[int, int]
    classes: list[str]
    multilabel: bool
    thresholds: list[float] | None
    info: dict

    def prepare(self, data: bytes) -> Tensor:
        """uint8 (3, H, W) of an image file's bytes, as ``predict`` prepares it."""
        decoded = torch.from_numpy(decode_image(io.BytesIO(data), self.stored_size).copy())
        return center_crop(decoded[None], self.input_size[0])[0]


def load_model(ckpt_path: str | None, model_file: str | None, device: str) -> ServedModel:
    """The checkpoint's model (as ``export`` builds it), or an exported ``.pt2`` / ``.onnx`` file with its JSON."""
    if ckpt_path:
        from transfer_lightning import export

        model, preprocessing = export.load_classifier(ckpt_path)
        network = model.network.to(device)
        if model.hparams.channels_last:  # as training and predict run it: about twice the images/s on a CPU
            network.to(memory_format=torch.channels_last)
        exported = export.ExportedClassifier(network, preprocessing, model.hparams.tta_flip, model.multilabel)
        exported = exported.to(device)
        # The description export writes beside a file, so that a checkpoint and an exported file are read alike.
        description = export.describe(model, preprocessing, "checkpoint", ckpt_path, 0.0)
        source = Path(ckpt_path)

        @torch.inference_mode()
        def run(images: Tensor) -> Tensor:
            return exported(images.to(device)).cpu()

    else:
        source = Path(model_file)
        description_file = Path(f"{model_file}.json")
        if not source.is_file() or not description_file.is_file():
            raise UserInputError(f"--model {model_file} needs the file and {description_file} beside it (from export).")
        description = json.loads(description_file.read_text())
        if source.suffix == ".onnx":
            from transfer_lightning.runtime import inference_session

            session = inference_session(source)  # once: a session per request would cost more than the model

            def run(images: Tensor) -> Tensor:
                return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])

        else:
            program = torch.export.load(source).module()

            @torch.inference_mode()
            def run(images: Tensor) -> Tensor:
                return program(images)

    output = description["output"]
    info = {
        "classes": description["classes"],
        "task": description.get("task", "multiclass"),
        "backbone": description["backbone"],
        "input": description["input"],
        "preprocessing": description["preprocessing"],
        "source": str(source),
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    thresholds = output.get("thresholds")
    return ServedModel(
        run=run,
        stored_size=tuple(description["resize_to_cover"]),
        input_size=tuple(description["center_crop"]),
        classes=description["classes"],
        multilabel=info["task"] == "multilabel",
        thresholds=list(thresholds.values()) if thresholds else None,
        info=info,
    )


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


def answer(model: ServedModel, probabilities: Tensor, names: list[str], top_k: int) -> list[dict]:
    """Per image: the predicted class (multi-label: the labels at or above threshold) and the top-k."""
    k = min(top_k, len(model.classes))
    answers = []
    for name, row in zip(names, probabilities.tolist(), strict=True):
        ranked = sorted(zip(row, model.classes, strict=True), reverse=True)[:k]
        entry = {
            "file": name,
            "class": ranked[0][1],
            "probability": ranked[0][0],
            "top_k": [{"class": c, "probability": p} for p, c in ranked],
        }
        if model.multilabel:
            entry["labels"] = [c for c, p, t in zip(model.classes, row, model.thresholds, strict=True) if p >= t]
        answers.append(entry)
    return answers


def build_server(args: argparse.Namespace):
    """The LitServer for ``args`` (see :func:`parser`)."""
    import litserve as ls
    from fastapi.responses import FileResponse

    from transfer_lightning.serve_api import ClassifierAPI, RejectBadJSON

    api = ClassifierAPI(args, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(
        api,
        accelerator=args.accelerator,
        devices=args.devices,
        workers_per_device=args.workers,
        model_metadata=load_model(args.ckpt_path, args.model, "cpu").info,
        max_payload_size=int(args.max_image_mb * MAX_IMAGES_PER_REQUEST * 2**20),
        middlewares=[RejectBadJSON],
    )
    # LitServe answers "/" with "litserve running"; the page takes its place.
    server.app.router.routes = [route for route in server.app.router.routes if getattr(route, "path", None) != "/"]
    server.app.add_api_route("/", lambda: FileResponse(PAGE, media_type="text/html"), methods=["GET"])
    return server


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m transfer_lightning serve",
        description="Serve a trained model over HTTP (LitServe): POST /predict, GET /health, /info and / (a page).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help="checkpoint written by fit")
    source.add_argument("--model", help="an exported .pt2 or .onnx file, with its .json beside it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch_size", type=int, default=16, help="requests batched into one forward pass")
    p.add_argument("--batch_timeout", type=float, default=0.01, help="seconds to wait for a batch to fill")
    p.add_argument("--workers", type=int, default=1, help="inference processes per device")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--max_image_mb", type=float, default=20.0, help="largest image file accepted, in MB")
    p.add_argument("--max_megapixels", type=float, default=50.0, help="largest image accepted, in megapixels")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--devices", default="auto", help="number of devices, or auto")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if importlib.util.find_spec("litserve") is None:
        raise UserInputError("serve needs LitServe: install the serve extra (pip install -e '.[serve]').")
    if args.devices != "auto":
        args.devices = int(args.devices)
    server = build_server(args)
    # Stop cleanly on SIGTERM (docker stop, kill) and on Ctrl+C, also where SIGINT was ignored when this
    # process started (commands started with & by a non-interactive shell inherit that).
    main_process = os.getpid()

    def interrupt(signal_number: int, frame) -> None:
        if os.getpid() == main_process:
            raise KeyboardInterrupt  # LitServe's run() shuts its workers down on KeyboardInterrupt
        signal.signal(signal_number, signal.SIG_DFL)  # a forked server process, stopped by that shutdown
        os.kill(os.getpid(), signal_number)

    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, interrupt)
    server.run(host=args.host, port=args.port, generate_client_file=False)
