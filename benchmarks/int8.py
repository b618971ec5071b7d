"""int8 against float32 on this CPU, side by side in one process: images/s of float32 torch (as ``serve --ckpt_path``
runs it), float32 ONNX Runtime and int8 ONNX Runtime (as ``serve --model FILE.onnx`` runs them) at batch 1 and 32,
the files' sizes, and with ``--checkpoints`` the test accuracy of trained models exported both ways.

    python benchmarks/int8.py --speed          # MobileNetV2 and EfficientNet-Lite0 (../shared's weights), ResNet18
    python benchmarks/int8.py --checkpoints lightning_logs/version_0/checkpoints/last.ckpt [...]

Speed is of the whole exported model (uint8 in, probabilities out) at 224 px; the int8 file is quantized with every
layer in int8 on random images, as the first recipe of ``export --quantize int8`` does with the run's own (the
calibration images change the ranges, not the graph or its speed). ``--checkpoints`` runs ``export`` itself, checked
on the validation split, and then measures both files on the test split, which neither export saw.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transfer_lightning import checkpoints  # noqa: E402
from transfer_lightning.data.transforms import Preprocessing  # noqa: E402
from transfer_lightning.errors import UserInputError  # noqa: E402
from transfer_lightning.inference.export import (  # noqa: E402
    ExportedClassifier,
    example_images,
    export,
    write_onnx_classifier,
)
from transfer_lightning.inference.quantize import QuantizeSettings, Recipe, has_vnni, pre_process, quantize  # noqa: E402
from transfer_lightning.inference.run_images import open_run_images  # noqa: E402
from transfer_lightning.model import TransferClassifier  # noqa: E402
from transfer_lightning.network.onnx import inference_session  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "weights"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def backbones() -> list[tuple[str, str, str | None]]:
    """(label, backbone, weights): ../shared's real weights where present, else random ones (timing only)."""
    mobilenet = SHARED / "mobilenet_v2_imagenet_features.pth"
    lite0 = SHARED / "tf_efficientnet_lite0.in1k"
    return [
        ("MobileNetV2", "mobilenet_v2", str(mobilenet) if mobilenet.is_file() else None),
        ("EfficientNet-Lite0", f"local-dir:{lite0}" if lite0.is_dir() else "timm/tf_efficientnet_lite0", "DEFAULT"),
        ("ResNet18 (random weights)", "resnet18", None),
    ]


def images_per_second(run, images: torch.Tensor, seconds: float) -> float:
    for _ in range(2):  # warm-up: first-call allocations and kernel choices
        run(images)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(images)
        done += len(images)
    return done / (time.perf_counter() - start)


def speed(seconds: float) -> None:
    preprocessing = Preprocessing((256, 256), "crop", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    columns = ("torch fp32", 11), ("ORT fp32", 9), ("ORT int8", 9), ("int8/ORT", 8), ("int8/torch", 10)
    print(f"{'model':<27} {'batch':>5} " + " ".join(f"{name:>{width}}" for name, width in columns))
    sizes = []
    for label, backbone, weights in backbones():
        model = TransferClassifier(backbone, weights, 10, channels_last=True).eval()
        model.network.to(memory_format=torch.channels_last)  # as serve --ckpt_path runs a channels_last model
        exported = ExportedClassifier.of(model, preprocessing).eval()
        with tempfile.TemporaryDirectory() as folder:
            float_file, int8_file = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
            write_onnx_classifier(exported, preprocessing, float_file)
            prepared = Path(folder) / "prepared.onnx"
            pre_process(float_file, prepared)
            calibration = example_images(preprocessing, 64, seed=3)
            quantize(
                prepared, int8_file, calibration, Recipe("every layer in int8", weight_bits=8 if has_vnni() else 7)
            )
            sessions = {name: inference_session(path) for name, path in (("float", float_file), ("int8", int8_file))}
            sizes.append((label, float_file.stat().st_size, int8_file.stat().st_size))
            for batch in (1, 32):
                images = example_images(preprocessing, batch, seed=batch)
                with torch.inference_mode():
                    eager = images_per_second(exported, images, seconds)
                rates = {
                    name: images_per_second(lambda x, s=session: s.run(None, {"images": x.numpy()}), images, seconds)
                    for name, session in sessions.items()
                }
                print(
                    f"{label:<27} {batch:>5} {eager:>11.1f} {rates['float']:>9.1f} {rates['int8']:>9.1f} "
                    f"{rates['int8'] / rates['float']:>7.2f}x {rates['int8'] / eager:>9.2f}x"
                )
    print("\nfile sizes (MB): " + "; ".join(f"{label} {f / 1e6:.1f} -> {i / 1e6:.1f}" for label, f, i in sizes))


def accuracy(checkpoint_paths: list[str], max_accuracy_drop: float) -> None:
    for path in checkpoint_paths:
        with tempfile.TemporaryDirectory() as folder:
            float_file, int8_file = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
            export(path, float_file)
            start = time.perf_counter()
            try:
                export(path, int8_file, int8=QuantizeSettings(max_accuracy_drop=max_accuracy_drop))
            except UserInputError as refusal:
                print(f"{path}: refused after {time.perf_counter() - start:.0f} s: {refusal}")
                continue
            took = time.perf_counter() - start
            quantization = json.loads(Path(f"{int8_file}.json").read_text())["quantization"]
            checkpoint = checkpoints.read_checkpoint(path)
            images = open_run_images(checkpoint, checkpoints.preprocessing(checkpoint, path))
            labels, answers = images.test.labels, {}
            for name, file in (("float", float_file), ("int8", int8_file)):
                session = inference_session(file)
                answers[name] = torch.cat(
                    [
                        torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
                        for x, _ in images.batches(images.test, 100)
                    ]
                ).argmax(1)
            test = {name: float((answer == labels).float().mean()) for name, answer in answers.items()}
            checked = quantization["checked"]
            print(
                f"{checkpoint['hyper_parameters']['backbone']}: int8 export {took:.0f} s ({quantization['recipe']}); "
                f"val ({checked['images']}) float {100 * checked['float']:.2f}% int8 {100 * checked['int8']:.2f}%; "
                f"test ({len(labels)}) float {100 * test['float']:.2f}% int8 {100 * test['int8']:.2f}% "
                f"(drop {100 * (test['float'] - test['int8']):.2f} points), same class for "
                f"{100 * float((answers['float'] == answers['int8']).float().mean()):.2f}%; "
                f"files {float_file.stat().st_size / 1e6:.1f} -> {int8_file.stat().st_size / 1e6:.1f} MB"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true", help="images/s of the three engines at batch 1 and 32")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per engine and batch size")
    parser.add_argument("--checkpoints", nargs="*", default=[], help="trained checkpoints to export and test")
    parser.add_argument("--max-accuracy-drop", type=float, default=QuantizeSettings.max_accuracy_drop)
    args = parser.parse_args()
    flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].splitlines()[0].split()
    print(f"CPU: {torch.get_num_threads()} threads; {' '.join(f for f in CPU_FLAGS if f in flags) or 'no AVX2'}")
    print(f"int8 weights: {7 if not has_vnni() else 8} bits (7 on CPUs without VNNI, whose 8-bit products saturate)\n")
    if args.speed:
        speed(args.seconds)
    accuracy(args.checkpoints, args.max_accuracy_drop)


if __name__ == "__main__":
    main()
