"""Side by side with fastai: the same transfer job, one after the other in this one process.

    python benchmarks/peers.py --job both --train-per-class 500 --test-per-class 200 --epochs 3
    python benchmarks/peers.py --backbone efficientnet_lite0 ...

Both tools get the same fixed stratified subset of the real CIFAR-10 PNGs of ``../shared`` (the first
``--train-per-class`` / ``--test-per-class`` files of each class, sorted), the same ImageNet weights (the
MobileNetV2 file, or the EfficientNet-Lite0 timm folder, which fastai also takes by timm name), image size,
batch size and epochs, and validate on the same held-out test images after
every epoch, which gives each tool's accuracy against wall time (time to the same accuracy: the lower of
the two last-epoch accuracies). The final test accuracy of both is scored here (argmax against the labels),
not by either tool's metric, each on its own evaluation pipeline: ours on the test images resized and
normalised on the device as in validation, fastai's on its validation loader (PIL resize). Jobs:

- ``finetune``: fastai's ``vision_learner`` + ``learn.fine_tune(epochs - 1, base_lr)`` (its one frozen epoch,
  then every layer with discriminative rates: ``epochs`` passes in all), against our closest recipe
  (``configs/recipes/finetune_fast.yaml``: gradual unfreezing is not it; the early blocks frozen, SGD
  with warmup and cosine, label smoothing);
- ``frozen``: fastai's frozen body (``learn.freeze()`` + ``fit_one_cycle``) against our frozen mode with
  the feature cache (Adam head: ``--head linear``, or ``mlp``, fastai's own head design; ``--stage-features``
  adds earlier stages' pooled outputs to the head's input; ``--adapt-bn-stats``
  recomputes the frozen BatchNorm statistics on the training images first), and fastai once more with
  ``train_bn=False``: its default keeps training the body's BatchNorm layers, which fixed features cannot do.

Augmentation differs and is named: fastai's idiomatic ``aug_transforms()`` (flip, rotation, zoom,
warp, lighting) against our padded crop and flip of the 32 px images; fastai resizes each image with
PIL (``Resize``), we resize batches on the device. Needs the ``bench`` extra (fastai). ``--accelerator cuda``
runs both on a GPU. The last line is machine-readable: the ratios, and each tool's final test accuracy
(``<job>_ours_acc``, ``<job>_fastai_acc``, ``frozen_frozen_bn_acc``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transfer_lightning.data import ImageFolderDataModule  # noqa: E402
from transfer_lightning.model import TransferClassifier  # noqa: E402
from transfer_lightning.optim import WarmupCosineLR  # noqa: E402
from transfer_lightning.training.feature_cache import FrozenFeatureCache  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


@dataclass(frozen=True)
class Backbone:
    """One backbone as each tool is given it: its weights in ``--shared``, and our recipe's settings for it."""

    weights: str  # relative to --shared
    ours: str  # our backbone name ({weights} is replaced by the weights' path)
    ours_weights: str
    normalization: str
    trainable_from: str  # as in our fine-tuning recipe for it
    fastai_arch: str | None  # a timm name fastai resolves itself; None: the torchvision MobileNetV2 below


BACKBONES = {
    "mobilenet_v2": Backbone(
        "weights/mobilenet_v2_imagenet_features.pth", "mobilenet_v2", "{weights}", "imagenet", "features.7", None
    ),
    "efficientnet_lite0": Backbone(
        "weights/tf_efficientnet_lite0.in1k",
        "local-dir:{weights}",
        "DEFAULT",
        "auto",
        "blocks.3",
        "tf_efficientnet_lite0",
    ),
}


@dataclass
class Result:
    """One tool's run: whole wall time, training images/s, peak resident memory, accuracy after each epoch."""

    tool: str
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    train_images: int = 0
    peak_rss_gib: float = 0.0
    rss_growth_gib: float = 0.0
    test_accuracy: float = 0.0
    #: (seconds since the tool started, test accuracy) after each epoch.
    curve: list[tuple[float, float]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.train_images / self.train_seconds if self.train_seconds else float("nan")

    def time_to(self, accuracy: float) -> float:
        """Seconds until the first epoch whose test accuracy reached ``accuracy`` (inf if none did)."""
        return next((seconds for seconds, value in self.curve if value >= accuracy - 1e-9), float("inf"))


class PeakMemory:
    """The process's peak resident memory while the ``with`` block runs (sampled every 50 ms from /proc), and
    its growth over the resident memory at the start: a tool run later in the process inherits what earlier
    ones left allocated, so the growth is the fairer figure."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._running = 0, True
        self.start = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as status:
            return 1024 * next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()


def make_subset(shared: Path, root: Path, train_per_class: int, test_per_class: int) -> Path:
    """``root/train/<class>/`` and ``root/test/<class>/`` of links to the first files of each class of the shared
    CIFAR-10."""
    source = shared / "data" / "cifar10"
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for folder in sorted((source / split).iterdir()):
            target = root / split / folder.name
            target.mkdir(parents=True)
            for file in sorted(folder.iterdir())[:count]:
                (target / file.name).symlink_to(file.resolve())
    return root


@torch.no_grad()
def score(predict, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Accuracy of ``predict`` (uint8 batch -> logits) on the test images, computed here."""
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = predict(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def test_tensors(subset: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The test images as they are on disk (uint8, 32 px), their labels and the class names."""
    dataset = torchvision.datasets.ImageFolder(subset / "test")
    images = torch.stack([torchvision.transforms.functional.pil_to_tensor(dataset[i][0]) for i in range(len(dataset))])
    return images, torch.tensor(dataset.targets), dataset.classes


class EpochClock(pl.Callback):
    """Our run's test accuracy (validation here is the test subset) and time after each epoch, and training time."""

    def __init__(self, result: Result, start: float) -> None:
        self.result, self.start, self._epoch_start = result, start, 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()
        if trainer.current_epoch == 0:  # the frozen features are computed before it: training time too
            self.result.train_seconds += self._epoch_start - self._fit_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.result.train_seconds += time.perf_counter() - self._epoch_start

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            accuracy = float(trainer.callback_metrics["val/acc"])
            self.result.curve.append((time.perf_counter() - self.start, accuracy))


def run_ours(args: argparse.Namespace, job: str, subset: Path, cache: Path, test) -> Result:
    result, start = Result("transfer_lightning"), time.perf_counter()
    frozen, backbone = job == "frozen", BACKBONES[args.backbone]
    weights = str(args.shared / backbone.weights)
    data = ImageFolderDataModule(
        data_dir=str(subset), val_size=0, batch_size=args.batch_size, image_size=args.image_size,
        normalization=backbone.normalization, augment=not frozen, cache_dir=str(cache),
    )  # fmt: skip
    steps = args.epochs * -(-10 * args.train_per_class // args.batch_size)
    if frozen:
        optimizer, scheduler = torch.optim.Adam, None
    else:
        optimizer = lambda params: torch.optim.SGD(params, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-5)  # noqa: E731
        scheduler = lambda opt: WarmupCosineLR(opt, warmup_steps=max(1, steps // 9), total_steps=steps)  # noqa: E731
    model = TransferClassifier(
        backbone.ours.format(weights=weights), backbone.ours_weights.format(weights=weights), num_classes=10,
        freeze_backbone=frozen, optimizer=optimizer, scheduler=scheduler, head=args.head if frozen else "linear",
        adapt_bn_stats=frozen and args.adapt_bn_stats, stage_features=args.stage_features if frozen else None,
        scheduler_interval="epoch" if frozen else "step", label_smoothing=0.0 if frozen else 0.1,
        trainable_from=None if frozen else backbone.trainable_from, no_weight_decay_on_norm_and_bias=not frozen,
    )  # fmt: skip
    data.use_weights(model.weights_preprocessing)  # as the CLI does: normalization auto takes the weights' own
    # On a CPU the frozen recipes compute features in batches of 25 (the fastest of 100, 50 and 25 there).
    feature_batch = 25 if args.accelerator == "cpu" else 500
    callbacks = [
        EpochClock(result, start),
        FrozenFeatureCache(store=False, engine=args.engine, batch_size=feature_batch),
    ]
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    result.train_images = len(data.train_set) * args.epochs
    model.eval()
    result.test_accuracy = score(
        lambda images: model(data.batch_transform(images.to(model.device), train=False)), *test[:2], args.batch_size
    )
    result.wall_seconds = time.perf_counter() - start
    return result


def run_fastai(args: argparse.Namespace, job: str, subset: Path, test, train_bn: bool = True) -> Result:
    from fastai.callback.core import Callback
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, aug_transforms, imagenet_stats, vision_learner
    from fastai.vision.learner import default_split, model_meta

    result, start = Result("fastai" if train_bn else "fastai, train_bn=False"), time.perf_counter()
    backbone = BACKBONES[args.backbone]
    weights = args.shared / backbone.weights
    if backbone.fastai_arch:  # timm's model by name, its weights from the local folder (fastai would download them)
        arch, arch_args = backbone.fastai_arch, {"pretrained_cfg_overlay": {"file": str(weights / "model.safetensors")}}
    else:

        def arch(weights=None, pretrained=True):
            """torchvision's MobileNetV2 with the shared ImageNet weights file (fastai would download its own)."""
            network = torchvision.models.mobilenet_v2(weights=None)
            network.load_state_dict(torch.load(args.shared / backbone.weights, weights_only=True), strict=False)
            return network

        # fastai finds a body's cut and layer groups in model_meta (2.8.12's vision_learner drops its cut argument).
        model_meta[arch], arch_args = {"cut": -1, "split": default_split, "stats": imagenet_stats}, {}

    class Clock(Callback):
        order = 100  # after the Recorder has computed the epoch's metrics

        recording = True  # off for get_preds, which runs the fit and epoch events too

        def before_epoch(self) -> None:
            self._start = time.perf_counter()

        def after_train(self) -> None:
            result.train_seconds += time.perf_counter() - self._start

        def after_epoch(self) -> None:
            if self.recording:
                result.curve.append((time.perf_counter() - start, float(self.learn.metrics[0].value)))

    dls = ImageDataLoaders.from_folder(
        subset, train="train", valid="test", item_tfms=Resize(args.image_size), bs=args.batch_size, num_workers=0,
        batch_tfms=None if job == "frozen" else aug_transforms(), device=torch.device(args.accelerator),
    )  # fmt: skip
    clock = Clock()
    learn = vision_learner(dls, arch, metrics=accuracy, cbs=clock, train_bn=train_bn, **arch_args)
    with learn.no_bar(), learn.no_logging():
        if job == "frozen":
            learn.freeze()
            learn.fit_one_cycle(args.epochs, args.fastai_lr)
        else:
            learn.fine_tune(args.epochs - 1, args.fastai_lr)  # 1 frozen epoch, then epochs - 1 with all layers
    result.train_images = len(dls.train_ds) * args.epochs
    # fastai's own evaluation pipeline (PIL resize), scored here: argmax against the labels.
    clock.recording = False
    probabilities, labels = learn.get_preds(dl=dls.valid)
    assert list(dls.vocab) == test[2], "both tools must number the classes alike"
    result.test_accuracy = float((probabilities.argmax(dim=1) == labels).float().mean())
    result.wall_seconds = time.perf_counter() - start
    return result


def report(job: str, ours: Result, peers: list[Result]) -> dict[str, float]:
    """The table of one job, and ours against each peer: wall time, training images/s, and time to the lower of
    the two last-epoch accuracies."""
    print(f"\n{job}:")
    print("| tool | wall s | train images/s | peak RSS GiB (growth) | test acc | acc per epoch |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in (ours, *peers):
        curve = ", ".join(f"{acc:.2%}@{sec:.0f}s" for sec, acc in r.curve)
        print(
            f"| {r.tool} | {r.wall_seconds:.1f} | {r.images_per_second:.0f} | "
            f"{r.peak_rss_gib:.2f} ({r.rss_growth_gib:+.2f}) | {r.test_accuracy:.2%} | {curve} |"
        )
    ratios = {f"{job}_ours_acc": ours.test_accuracy}
    for theirs in peers:
        # From the curves each tool recorded while training, not the final scores: an independent final score may
        # differ from a tool's own last epoch by an image or two, and then the lower tool would never reach it.
        target = min(ours.curve[-1][1], theirs.curve[-1][1])
        name = job if theirs.tool == "fastai" else f"{job}_frozen_bn"
        ratios |= {
            f"{job}_fastai_acc" if theirs.tool == "fastai" else f"{name}_acc": theirs.test_accuracy,
            f"{name}_wall": theirs.wall_seconds / ours.wall_seconds,
            f"{name}_images_per_s": ours.images_per_second / theirs.images_per_second,
            f"{name}_time_to_acc": theirs.time_to(target) / ours.time_to(target),
        }
        wall, images, to_acc = (ratios[f"{name}_{what}"] for what in ("wall", "images_per_s", "time_to_acc"))
        print(
            f"against {theirs.tool}: the same accuracy {target:.2%} (the lower last epoch) after "
            f"{ours.time_to(target):.1f} s (ours) and {theirs.time_to(target):.1f} s; ours against theirs: "
            f"wall x{wall:.2f}, train images/s x{images:.2f}, time to the same acc x{to_acc:.2f}"
        )
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=("finetune", "frozen", "both"), default="both")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="mobilenet_v2")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--fastai-lr", type=float, default=2e-3, help="fastai's base_lr (fine_tune's default)")
    parser.add_argument("--accelerator", default="cpu", help="cpu or cuda")
    parser.add_argument("--engine", default="auto", help="our feature cache's engine (auto: onnxruntime on a CPU)")
    parser.add_argument("--head", choices=("linear", "mlp"), default="linear", help="our frozen job's head")
    parser.add_argument(
        "--adapt-bn-stats", action="store_true", help="our frozen job: BatchNorm statistics of the training images"
    )
    parser.add_argument(
        "--stage-features",
        type=lambda names: names.split(","),
        help="our frozen job: modules whose pooled outputs join the head's input, comma-separated (features.6,...)",
    )
    parser.add_argument("--shared", type=Path, default=SHARED, help="data/cifar10 and weights/, as in ../shared")
    args = parser.parse_args(argv)
    weights = args.shared / BACKBONES[args.backbone].weights
    if not weights.exists():
        raise SystemExit(
            f"{weights} is missing: this benchmark runs on the project's ../shared data and weights "
            "(or a folder of the same layout: --shared)."
        )
    missing = [name for name in ("fastai", "timm", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"benchmarks/peers.py needs {', '.join(missing)}: pip install -e '.[bench]'")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu: {os.cpu_count()} cores")
    ratios = {}
    with tempfile.TemporaryDirectory() as folder:
        subset = make_subset(args.shared, Path(folder) / "cifar10", args.train_per_class, args.test_per_class)
        test = test_tensors(subset)
        for job in ("finetune", "frozen") if args.job == "both" else (args.job,):
            runners = [
                partial(run_ours, args, job, subset, Path(folder) / "cache", test),
                partial(run_fastai, args, job, subset, test),
            ]
            if job == "frozen":
                runners.append(partial(run_fastai, args, job, subset, test, train_bn=False))
            results = []
            for runner in runners:
                with PeakMemory() as memory:
                    result = runner()
                result.peak_rss_gib, result.rss_growth_gib = memory.peak / 2**30, (memory.peak - memory.start) / 2**30
                results.append(result)
            ratios |= report(job, results[0], results[1:])
    print("peers " + " ".join(f"{name}={value:.3f}" for name, value in ratios.items()))


if __name__ == "__main__":
    main()
