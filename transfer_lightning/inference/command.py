"""``python -m transfer_lightning export``: a checkpoint as a stand-alone file (:mod:`.export`: ``onnx``, ``pt2``)
or as a model folder in the Hugging Face Hub's layout (:mod:`.hub`: ``hub``, for timm backbones)."""

from __future__ import annotations

import argparse
from pathlib import Path

from transfer_lightning.inference.export import FORMATS, export


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
    args = parser.parse_args(argv)
    if args.output is None and args.format is None:
        parser.error("give --format onnx|pt2|hub, or an --output file ending in .onnx or .pt2")
    if args.format == "hub":
        from transfer_lightning.inference.hub import export_hub  # imports timm (the timm extra)

        output = args.output or str(Path(args.ckpt_path).with_suffix(""))
        written = export_hub(args.ckpt_path, output)
        print(f"Wrote {written}/ (model.safetensors, config.json, README.md; checked against the checkpoint).")
        print(f"Load: timm.create_model('local-dir:{written}', pretrained=True). Upload: hf upload ORG/NAME {written}")
        return
    output = args.output or str(Path(args.ckpt_path).with_suffix(f".{args.format}"))
    written = export(args.ckpt_path, output, args.format)
    print(f"Wrote {written} and {written}.json (checked against the checkpoint).")
