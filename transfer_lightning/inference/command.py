"""``python -m transfer_lightning export``: a checkpoint as a stand-alone file (:mod:`.export`: ``onnx``, ``pt2``;
ONNX also int8, :mod:`.quantize`) or as a model folder in the Hugging Face Hub's layout (:mod:`.hub`: ``hub``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from transfer_lightning.errors import UserInputError
from transfer_lightning.inference.export import FORMATS, export
from transfer_lightning.inference.quantize import QUANTIZATIONS, QuantizeSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m transfer_lightning export",
        description="Write a trained checkpoint as a model file that runs without this package: "
        "uint8 RGB images (N, 3, H, W) in, class probabilities out; FILE.json says how to prepare images. "
        "--format hub writes a timm model folder for the Hugging Face Hub instead (upload: hf upload ORG/NAME DIR).",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by fit (lightning_logs/.../*.ckpt)")
    parser.add_argument(
        "--format", choices=(*FORMATS, "hub"), help="onnx, pt2 (torch.export) or hub; default: the suffix of --output"
    )
    parser.add_argument("--output", help="file (folder for hub) to write; default: beside the checkpoint")
    int8 = parser.add_argument_group("int8 (ONNX; docs/guides/use.md#int8)")
    int8.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="int8: ONNX Runtime's static quantization, checked on the run's val split",
    )
    int8.add_argument(
        "--calibration-images", type=int, default=QuantizeSettings.calibration_images,
        help="training images that calibrate the activation ranges (default: %(default)s)",
    )  # fmt: skip
    int8.add_argument(
        "--max-accuracy-drop", type=float, default=QuantizeSettings.max_accuracy_drop,
        help="largest drop of the validation accuracy (mAP) in points that is written (default: %(default)s)",
    )  # fmt: skip
    int8.add_argument("--data.data_dir", dest="data_dir", help="where the run's images are now, if they moved")
    args = parser.parse_args(argv)
    if args.output is None and args.format is None:
        parser.error("give --format onnx|pt2|hub, or an --output file ending in .onnx or .pt2")
    if args.quantize and args.format == "hub":
        raise UserInputError("--quantize int8 makes ONNX files only: use --format onnx, not hub.")
    if args.format == "hub":
        from transfer_lightning.inference.hub import export_hub  # imports timm (the timm extra)

        output = args.output or str(Path(args.ckpt_path).with_suffix(""))
        written = export_hub(args.ckpt_path, output)
        print(f"Wrote {written}/ (model.safetensors, config.json, README.md; checked against the checkpoint).")
        print(f"Load: timm.create_model('local-dir:{written}', pretrained=True). Upload: hf upload ORG/NAME {written}")
        return
    output = args.output or str(Path(args.ckpt_path).with_suffix(f".{args.format}"))
    settings = QuantizeSettings(args.calibration_images, args.max_accuracy_drop) if args.quantize else None
    written = export(args.ckpt_path, output, args.format, settings, args.data_dir)
    checked = "against the float file on the validation split" if settings else "against the checkpoint"
    print(f"Wrote {written} and {written}.json (checked {checked}).")
