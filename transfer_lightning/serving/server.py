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
import importlib.util
import os
import signal
from pathlib import Path

from transfer_lightning.errors import UserInputError
from transfer_lightning.serving.requests import MAX_IMAGES_PER_REQUEST, load_model

PAGE = Path(__file__).resolve().parent / "static" / "index.html"


def build_server(args: argparse.Namespace):
    """The LitServer for ``args`` (see :func:`parser`)."""
    import litserve as ls  # the [serve] extra, checked by main() first
    from fastapi.responses import FileResponse

    from transfer_lightning.serving.api import ClassifierAPI, RejectBadJSON

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
    source.add_argument(
        "--model", help="an exported .pt2 or .onnx file with its .json beside it, or a folder of export --format hub"
    )
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
