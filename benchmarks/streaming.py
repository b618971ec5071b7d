"""The local decoded store against optimized data sets (LitData), locally and on a loopback S3 server, side by side.

    python benchmarks/streaming.py --per-class 2000 --photos 100 --memory-images 12000 --memory-limit-gib 1

For two data sets, the real CIFAR-10 of ``../shared`` (``--per-class`` training images of each class and its
test split, 32x32 PNGs) and a folder of large photos (``--photos`` per class, 1600x1200 JPEGs made here by
enlarging CIFAR-10 images, kept at ``--image-size``), it measures in one process run:

- the preparation: seconds to decode the local store, to ``optimize`` into a local folder and into ``s3://`` on
  moto's server on 127.0.0.1, and the disk size of the store and of the optimized data set;
- the data path: images/s of the training loader (every batch read and prepared for the network, no model);
- training: images/s of ``fit`` (ResNet-18 from random weights, ``--fit-batches`` batches of 100, one process).

Then memory: ``--memory-images`` CIFAR-10 images enlarged to 224 (stored at 256, raw pixels, 192 KiB each) are
optimized, and one training-loader epoch over them runs in a child process under a cgroup memory limit of
``--memory-limit-gib`` (cgroup v1 or v2; needs root, else it says so and skips): the data set is larger than the
memory the reader may use, and its peak is printed. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from transfer_lightning import ImageFolderDataModule, TransferClassifier  # noqa: E402
from transfer_lightning.commands import optimize  # noqa: E402
from transfer_lightning.training import TrainingSpeed  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR = SHARED / "data" / "cifar10"
#: Size of the made-up large photos (width, height).
PHOTO_SIZE = (1600, 1200)


def linked_cifar(root: Path, per_class: int, splits: dict[str, int]) -> Path:
    """``root/<split>/<class>/`` linking the first images of each class of ../shared's CIFAR-10."""
    for split, count in splits.items():
        for folder in sorted((CIFAR / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for file in sorted(folder.iterdir())[:count]:
                (root / split / folder.name / file.name).symlink_to(file.resolve())
    return root


def large_photos(root: Path, per_class: int) -> Path:
    """``root/train`` and ``root/test`` of 1600x1200 JPEGs: CIFAR-10 images enlarged (bicubic), quality 90."""
    for split, count in (("train", per_class), ("test", max(1, per_class // 5))):
        for folder in sorted((CIFAR / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for file in sorted(folder.iterdir())[:count]:
                with Image.open(file) as image:
                    image.convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(
                        root / split / folder.name / f"{file.stem}.jpg", quality=90
                    )
    return root


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def loader_speed(data: ImageFolderDataModule, batches: int) -> float:
    """Images/s of the training loader: batches read and prepared (normalised, resized) as training gets them."""
    data.setup("fit")
    loader = data.train_dataloader()
    count, start = 0, time.perf_counter()
    for index, (images, _) in enumerate(loader):
        data.batch_transform(images, train=True)
        count += len(images)
        if index + 1 == batches:
            break
    return count / (time.perf_counter() - start)


def fit_speed(data: ImageFolderDataModule, batches: int) -> float:
    """Images/s of ``fit`` (our TrainingSpeed callback) over ``batches`` batches, without validation."""
    speed = TrainingSpeed()
    model = TransferClassifier("resnet18", num_classes=data.num_classes, class_names=data.class_names, weights=None)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=batches, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", callbacks=[speed],
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return speed.history[-1]


def measure(
    name: str, tree: Path, work: Path, image_size: int | None, endpoint: str, batches: int, fit_batches: int
) -> list[str]:
    """One table row per source of one data set."""
    common = {"batch_size": 100, "val_size": 0.1, "image_size": image_size, "augment": True}
    storage = {"endpoint_url": endpoint}
    local = ImageFolderDataModule(data_dir=str(tree), cache_dir=str(work / "cache"), **common)
    store_seconds = timed(local.prepare_data)
    store_bytes = sum(folder_bytes(work / "cache" / entry.name) for entry in (work / "cache").iterdir())
    size_arg = "null" if image_size is None else image_size
    args = [f"--data.data_dir={tree}", "--data.val_size=0.1", f"--data.image_size={size_arg}",
            f"--data.cache_dir={work / 'cache'}"]  # fmt: skip
    optimized = work / f"{name}-optimized"
    local_seconds = timed(optimize.main, [*args, f"--output={optimized}"])
    to_s3 = [*args, f"--output=s3://bench/{name}", f"--data.storage_options={json.dumps(storage)}"]
    s3_seconds = timed(optimize.main, to_s3)
    rows = []
    sources = [
        ("local store", local, store_seconds, store_bytes),
        ("optimized, local folder", dict(streaming_dir=str(optimized)), local_seconds, folder_bytes(optimized)),
        ("optimized, loopback S3", dict(streaming_dir=f"s3://bench/{name}", storage_options=storage), s3_seconds,
         folder_bytes(optimized)),
    ]  # fmt: skip
    for label, source, seconds, size in sources:
        if isinstance(source, ImageFolderDataModule):
            source = dict(data_dir=str(tree))
        settings = {**common, **source, "cache_dir": str(work / "cache")}
        loader = loader_speed(ImageFolderDataModule(**settings), batches)
        training = fit_speed(ImageFolderDataModule(**settings), fit_batches)
        rows.append(f"| {name} | {label} | {seconds:.1f} | {size / 2**20:.1f} | {loader:.0f} | {training:.0f} |")
        print(rows[-1], flush=True)
    return rows


def enlarged_cifar(root: Path, per_class: int) -> Path:
    """``root/<class>/`` of CIFAR-10 training images enlarged to 300x260 or 260x300 (two sizes: stored at 256)."""
    for folder in sorted((CIFAR / "train").iterdir()):
        (root / folder.name).mkdir(parents=True)
        for index, file in enumerate(sorted(folder.iterdir())[:per_class]):
            with Image.open(file) as image:
                size = (300, 260) if index % 2 else (260, 300)
                image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
                    root / folder.name / f"{file.stem}.jpg"
                )
    return root


def memory_check(work: Path, images: int, limit_gib: float) -> str:
    """Optimize ``images`` enlarged CIFAR-10 images at 224 (stored at 256, raw), then read one training-loader
    epoch of them under a cgroup memory limit."""
    tree = enlarged_cifar(work / "memory-tree", images // 10)
    output = work / "memory-optimized"
    optimize.main([f"--data.data_dir={tree}", "--data.val_size=10", "--data.image_size=224", "--encoding=raw",
                   f"--data.cache_dir={work / 'cache'}", f"--output={output}"])  # fmt: skip
    size = folder_bytes(output)
    probe = make_cgroup(int(limit_gib * 2**30))
    if probe is None:
        return f"memory: not measured (no writable cgroup here); data set {size / 2**30:.2f} GiB"
    probe.remove()
    reader = (
        "import sys, time; sys.path.insert(0, sys.argv[2]);"
        "from transfer_lightning import ImageFolderDataModule;"
        "d = ImageFolderDataModule(streaming_dir=sys.argv[1], batch_size=100, image_size=224, cache_dir=sys.argv[3]);"
        "d.setup('fit'); n = 0; t = time.perf_counter()\n"
        "for images, _ in d.train_dataloader():\n"
        "    n += len(images)\n"
        "    if n >= int(sys.argv[4]): break\n"
        "print(n, n / (time.perf_counter() - t))"
    )
    peaks = {}
    for label, count in (("start-up only", 100), ("whole epoch", images)):
        command = [sys.executable, "-c", reader, str(output), str(Path(__file__).resolve().parents[1]),
                   str(work / "c"), str(count)]  # fmt: skip
        cgroup = make_cgroup(int(limit_gib * 2**30))
        result = subprocess.run(command, capture_output=True, text=True, preexec_fn=lambda c=cgroup: c.enter(0))
        peaks[label] = cgroup.peak()
        cgroup.remove()
        if result.returncode != 0:
            return (
                f"memory: the reader failed (status {result.returncode}) under {limit_gib} GiB: {result.stderr[-300:]}"
            )
    read, speed = result.stdout.split()[-2:]
    return (
        f"memory: {read} images ({size / 2**30:.2f} GiB optimized, raw) read at {float(speed):.0f} images/s under a "
        f"{limit_gib} GiB cgroup limit; peak use (resident + page cache) {peaks['whole epoch'] / 2**30:.2f} GiB, "
        f"against {peaks['start-up only'] / 2**30:.2f} GiB for start-up and the first batch"
    )


class Cgroup:
    """A memory cgroup (v1 or v2) that a child process enters before it starts."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path, self.v2 = path, v2

    def enter(self, pid: int) -> None:
        """Move process ``pid`` (0: the calling one) into this cgroup."""
        (self.path / "cgroup.procs").write_text(str(pid or os.getpid()))

    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text()) if (self.path / name).exists() else -1

    def remove(self) -> None:
        self.path.rmdir()


def make_cgroup(limit: int) -> Cgroup | None:
    for root, v2, name in ((Path("/sys/fs/cgroup/memory"), False, "memory.limit_in_bytes"),
                           (Path("/sys/fs/cgroup"), True, "memory.max")):  # fmt: skip
        path = root / f"transfer-lightning-bench-{os.getpid()}"
        try:
            path.mkdir()
            (path / name).write_text(str(limit))
            return Cgroup(path, v2)
        except OSError:
            if path.exists():
                path.rmdir()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=1000, help="CIFAR-10 training images per class")
    parser.add_argument("--photos", type=int, default=100, help="large photos per class (training)")
    parser.add_argument("--image-size", type=int, default=224, help="network input size for the large photos")
    parser.add_argument("--batches", type=int, default=20, help="batches of 100 read per loader measurement")
    parser.add_argument("--fit-batches", type=int, default=5, help="batches of 100 trained per fit measurement")
    parser.add_argument("--memory-images", type=int, default=12000)
    parser.add_argument("--memory-limit-gib", type=float, default=1.0)
    args = parser.parse_args()
    if not CIFAR.is_dir():
        raise SystemExit(f"{CIFAR} is missing: this benchmark reads the project's ../shared.")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {capability}")
    print("| data | source | prepare s | disk MiB | loader images/s | fit images/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        test_count = max(1, args.per_class // 5)
        cifar = linked_cifar(work / "cifar", args.per_class, {"train": args.per_class, "test": test_count})
        rows = measure("cifar10", cifar, work / "cifar-work", None, endpoint, args.batches, args.fit_batches)
        photos = large_photos(work / "photos", args.photos)
        rows += measure(
            "photos", photos, work / "photos-work", args.image_size, endpoint, args.batches, args.fit_batches
        )
        memory = memory_check(work, args.memory_images, args.memory_limit_gib)
        print(memory)
    server.stop()
    print("RESULT " + json.dumps({"rows": rows, "memory": memory}))


if __name__ == "__main__":
    main()
