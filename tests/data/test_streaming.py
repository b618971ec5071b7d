"""Optimized data sets (LitData): written once by ``optimize``, streamed by fit/test, resumed mid-epoch."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.conftest import write_tagged_images
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.data import ImageFolderDataModule, decode_image, optimizing
from transfer_lightning.data.optimizing import encode_sample
from transfer_lightning.data.streaming import INFO_FILE, decode_item, open_split
from transfer_lightning.reporting.runs import read_run

pytest.importorskip("litdata", reason="the stream extra is not installed")

#: Small chunks, so that even these tiny splits have several (LitData shards by chunk across ranks and workers).
CHUNKS = "--chunk_bytes=16KB"


def pixel_digest(images: torch.Tensor) -> list[str]:
    """One digest per uint8 image: the images compared as a multiset, whatever their order."""
    return [hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()[:16] for image in images]


def optimize(*args: str) -> None:
    main(["optimize", "--workers=1", CHUNKS, *args])


@pytest.fixture(scope="module")
def optimized(image_folder, tmp_path_factory) -> Path:
    """The image folder (train/ + test/) optimized with raw pixels: 20 images held out for val, seed 0."""
    output = tmp_path_factory.mktemp("optimized") / "cifar-like"
    cache = tmp_path_factory.mktemp("cache")
    optimize(f"--data.data_dir={image_folder}", "--data.val_size=20", f"--data.cache_dir={cache}", "--encoding=raw",
             f"--output={output}")  # fmt: skip
    return output


def stream_images(root: Path, split: str, tmp_path: Path) -> torch.Tensor:
    dataset = open_split(str(root), split, False, 0, "1GB", None, tmp_path)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_optimize_writes_the_splits_the_local_store_makes(optimized, image_folder, tmp_path):
    """Same split rule, same seed, same resize: each split holds exactly the local data module's images."""
    info = json.loads((optimized / INFO_FILE).read_text())
    assert info["split_sizes"] == {"train": 100, "val": 20, "test": 32}
    assert info["class_names"] == ["cat", "dog", "frog", "ship"] and info["task"] == "multiclass"
    assert info["train_class_counts"] == [25, 25, 25, 25]
    local = ImageFolderDataModule(data_dir=str(image_folder), val_size=20, cache_dir=str(tmp_path / "cache"))
    local.prepare_data()
    local.setup("fit")
    for split, dataset in (("train", local.train_set), ("val", local.val_set), ("test", local.test_set)):
        expected, _ = dataset.to_arrays()
        assert sorted(pixel_digest(stream_images(optimized, split, tmp_path))) == sorted(pixel_digest(expected)), split
    assert not list(optimized.parent.glob(".*tmp")), "no temporary folder left beside the data set"


@pytest.mark.slow  # 12 s: LitData's worker processes each import torch and this package
def test_optimize_with_worker_processes_to_s3_writes_what_this_process_writes(
    optimized, image_folder, s3_endpoint, tmp_path, monkeypatch
):
    """LitData's own path (a process per worker, uploading to the loopback S3 server) writes the same items as
    the in-process writer of small splits."""
    # As if the training split were large: its 100 images go to the workers (val's 20 and test's 32 are all
    # encoded by the first look, which leaves no time to estimate, so they stay here).
    monkeypatch.setattr(optimizing, "POOL_MIN_SECONDS", 1e-9)
    storage = {"endpoint_url": s3_endpoint}
    main(["optimize", "--workers=2", CHUNKS, f"--data.data_dir={image_folder}", "--data.val_size=20",
          f"--data.cache_dir={tmp_path / 'cache'}", "--encoding=raw", "--output=s3://photos/parallel",
          f"--data.storage_options={json.dumps(storage)}"])  # fmt: skip
    for split in ("train", "val", "test"):
        here = stream_images(optimized, split, tmp_path)
        uploaded = torch.stack([image for image, _ in open_split("s3://photos/parallel", split, False, 0, "1GB",
                                                                 storage, tmp_path / "chunks")])  # fmt: skip
        assert sorted(pixel_digest(uploaded)) == sorted(pixel_digest(here)), split


def test_jpeg_items_decode_to_the_stored_pixels(tmp_path):
    """A JPEG item decodes (torchvision) to the resized image within JPEG's error; raw items are exact."""
    photo = tmp_path / "photo.png"
    gradient = np.linspace(0, 255, 90 * 60 * 3).reshape(60, 90, 3).astype(np.uint8)
    Image.fromarray(gradient).save(photo)
    expected = torch.from_numpy(decode_image(str(photo), (48, 48))).float()
    for encoding, tolerance in (("jpeg", 3.0), ("raw", 0.0)):
        item = encode_sample((str(photo), 2), ((48, 48), "bilinear", None), encoding, 95, str(tmp_path))
        image, label = decode_item(item)
        assert image.shape == (3, 48, 48) and image.dtype == torch.uint8 and int(label) == 2
        assert (image.float() - expected).abs().mean() <= tolerance, encoding


def stream_args(optimized: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--data.streaming_dir={optimized}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.batch_size=16",
        "--model.weights=null",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--seed_everything=0",
        *extra,
    ]


class RecordBatches(pl.Callback):
    """Appends (epoch, batch index, digest of the batch, digests of its images) of every training and test batch
    to ``path`` (``{rank}`` in it is the process's rank); raises KeyboardInterrupt (Ctrl+C) before step ``stop_at``."""

    def __init__(self, path: str, stop_at: int = -1) -> None:
        self.path, self.stop_at = path, stop_at

    def _write(self, trainer, stage: str, images: torch.Tensor, batch_idx: int) -> None:
        digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]
        row = [stage, trainer.current_epoch, batch_idx, digest, pixel_digest(images)]
        with Path(self.path.format(rank=trainer.global_rank)).open("a") as file:
            file.write(json.dumps(row) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.stop_at:
            raise KeyboardInterrupt
        self._write(trainer, "train", batch[0], batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._write(trainer, "test", batch[0], batch_idx)


def recorded(path: Path, stage: str = "train") -> list[list]:
    """(epoch, batch index, batch digest) of the batches of ``stage`` recorded in ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row[1:4] for row in rows if row[0] == stage]


def recorded_images(path: Path, stage: str, epoch: int | None = None) -> list[str]:
    """Digests of the images of ``stage`` (in ``epoch``, or in all) recorded in ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [digest for row in rows if row[0] == stage and epoch in (None, row[1]) for digest in row[4]]


def test_fit_from_a_stream_learns_and_resumes_mid_epoch_where_it_stopped(optimized, run_dir):
    """Ctrl+C at step 3 of 7, then fit --ckpt_path last: the batches of both runs are the uninterrupted run's, in
    its order, over two epochs, with two loader workers (LitData's own state skipped a batch and replayed epoch 0's
    order in epoch 1). The uninterrupted run learned the colour classes, and the model has the data set's names."""
    workers = 2

    def fit(name: str, *extra: str) -> TransferLightningCLI:
        args = ["--trainer.max_epochs=2", "--data.augment=false", f"--data.num_workers={workers}",
                f"--trainer.logger.init_args.save_dir={run_dir / name}", *extra]  # fmt: skip
        return TransferLightningCLI(args=stream_args(optimized, run_dir, *args))

    def recorder(path: str, stop_at: int = -1) -> str:
        init = {"path": str(run_dir / path), "stop_at": stop_at}
        return "--trainer.callbacks+=" + json.dumps({"class_path": f"{__name__}.RecordBatches", "init_args": init})

    straight_run = fit("straight", recorder("straight.jsonl"))
    test_acc = float(straight_run.trainer.callback_metrics["test/acc"])
    assert test_acc > 0.5  # 4 colour classes: chance is 0.25
    assert straight_run.model.class_names == ["cat", "dog", "frog", "ship"]
    best = straight_run.trainer.checkpoint_callback.best_model_path
    predict = ["predict", *stream_args(optimized, run_dir)[1:], f"--ckpt_path={best}",
               f"--trainer.logger.init_args.save_dir={run_dir / 'predicted'}"]  # fmt: skip
    TransferLightningCLI(args=predict)
    with open(next((run_dir / "predicted").rglob("predictions.csv"))) as file:
        rows = list(csv.DictReader(file))
    assert sorted(int(row["index"]) for row in rows) == list(range(32))  # the test split, each image once
    assert sum(row["true_class"] == row["predicted_class"] for row in rows) / 32 == pytest.approx(test_acc)
    with pytest.raises(SystemExit):  # Lightning exits with status 1 after a KeyboardInterrupt
        main(stream_args(optimized, run_dir, "--trainer.max_epochs=2", "--data.augment=false",
                         f"--data.num_workers={workers}", f"--trainer.logger.init_args.save_dir={run_dir / 'cut'}",
                         recorder("first.jsonl", stop_at=3)))  # fmt: skip
    fit("cut", "--ckpt_path=last", "--test_after_fit=false", recorder("resumed.jsonl"))
    straight = recorded(run_dir / "straight.jsonl")
    assert len(straight) == 14  # 100 images in batches of 16: 7 per epoch
    assert recorded(run_dir / "first.jsonl") + recorded(run_dir / "resumed.jsonl") == straight


@pytest.fixture
def s3_endpoint(monkeypatch) -> str:
    """moto's S3 server on 127.0.0.1 (a free port), with a bucket ``photos`` and test credentials only."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="photos")
    yield endpoint
    requests.post(f"{endpoint}/moto-api/reset", timeout=10)  # moto keeps its buckets per process, not per server
    server.stop()


def run_cli(*args: str, cwd: Path, status: int = 0, timeout: float = 180) -> str:
    """The real entry point in a fresh process (Lightning's DDP launcher starts the second one), bounded in time;
    its exit status must be ``status``. Returns what it wrote (stdout and stderr)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "transfer_lightning", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == status, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow  # 37 s; the default suite keeps S3 (errors, interrupts) and a stream's fit and resume apart
def test_s3_optimize_ddp_fit_resume_and_test(image_folder, s3_endpoint, tmp_path, monkeypatch):
    """The photo folder optimized to s3:// on a loopback S3 server; two CPU processes (DDP) train from it, stop at
    step 3 of epoch 0, resume from last.ckpt, and test: no training image is read twice in the cut epoch,
    each test image exactly once across the processes, and the test metrics equal one process's."""
    url = "s3://photos/datasets/cifar-like"
    storage = f"--data.storage_options={json.dumps({'endpoint_url': s3_endpoint})}"
    optimize(f"--data.data_dir={image_folder}", "--data.val_size=20", f"--data.cache_dir={tmp_path / 'cache'}",
             f"--output={url}", storage)  # fmt: skip

    def record(stop_at: int = -1) -> str:
        init = {"path": "{rank}.jsonl", "stop_at": stop_at}
        return "--trainer.callbacks+=" + json.dumps({"class_path": f"{__name__}.RecordBatches", "init_args": init})

    common = [
        f"--data.streaming_dir={url}", storage, f"--data.cache_dir={tmp_path / 'cache'}", "--data.batch_size=8",
        "--data.augment=false", "--model.weights=null", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    # 100 training images, 50 per process: 7 batches of 8 per epoch. Ctrl+C in both processes before step 3.
    run_cli("fit", *common, record(stop_at=3), cwd=tmp_path, status=1)
    run_cli("fit", *common, "--ckpt_path=last", record(), cwd=tmp_path)

    # The callback sees batches as the network does (normalised on the device): the training split, read here in
    # one process, goes through the same transform (elementwise and correctly rounded, so bit for bit the same).
    stream = ImageFolderDataModule(streaming_dir=url, storage_options={"endpoint_url": s3_endpoint},
                                   cache_dir=str(tmp_path / "single"))  # fmt: skip
    stream.setup("fit")
    images = torch.stack([image for image, _ in stream.train_set])
    expected = pixel_digest(stream.batch_transform(images, train=False))
    cut_epoch = recorded_images(tmp_path / "0.jsonl", "train", 0) + recorded_images(tmp_path / "1.jsonl", "train", 0)
    # Each process reads 6 whole batches of its 50 images (LitData drops the uneven rest in DDP training, as an
    # uninterrupted DDP epoch does): 3 before the cut and 3 after it, none twice, all from the training split.
    assert len(cut_epoch) == len(set(cut_epoch)) == 96 and set(cut_epoch) <= set(expected)
    tested = recorded_images(tmp_path / "0.jsonl", "test") + recorded_images(tmp_path / "1.jsonl", "test")
    assert len(tested) == 32 and len(set(tested)) == 32  # no padding, no image twice

    resumed = tmp_path / "lightning_logs" / "version_1"  # the resumed run logs into a new version
    ddp = read_run(resumed)
    best = next(path for path in (resumed / "checkpoints").glob("*.ckpt") if path.name != "last.ckpt")
    monkeypatch.chdir(tmp_path)
    ddp_only = ("--trainer.devices", "--trainer.strategy")
    one_process = [arg for arg in common if not arg.startswith(ddp_only)]
    single = TransferLightningCLI(args=["test", *one_process, "--trainer.devices=1", f"--ckpt_path={best}"])
    for tag in ("test/acc", "test/acc_cat", "test/loss"):
        assert ddp.scalars[tag][-1] == pytest.approx(float(single.trainer.callback_metrics[tag]), abs=1e-6), tag


def one_error_line(args: list[str], capsys) -> str:
    """Run the CLI, which must exit 2 with one ``error:`` line and no traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


@pytest.mark.parametrize(
    "url, expected",
    [("s3://photos/not-optimized", "does not exist"), ("s3://no-such-bucket/data", "does not exist")],
)
def test_unreadable_s3_data_sets_are_one_line(s3_endpoint, run_dir, capsys, url, expected):
    storage = f"--data.storage_options={json.dumps({'endpoint_url': s3_endpoint})}"
    assert expected in one_error_line(["fit", f"--data.streaming_dir={url}", storage, "--model.weights=null"], capsys)
    assert not (run_dir / "lightning_logs").exists()


def test_missing_credentials_and_a_closed_port_are_one_line(s3_endpoint, run_dir, capsys, monkeypatch):
    storage = f"--data.storage_options={json.dumps({'endpoint_url': s3_endpoint})}"
    args = ["fit", "--data.streaming_dir=s3://photos/data", storage, "--model.weights=null"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(run_dir / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(run_dir / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no look-up beyond this machine
    assert "No credentials" in one_error_line(args, capsys)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    closed = f"--data.storage_options={json.dumps({'endpoint_url': 'http://127.0.0.1:9'})}"  # discard port: closed
    assert "Cannot connect" in one_error_line([*args[:2], closed, args[3]], capsys)


def test_a_stream_made_for_another_size_or_task_is_one_line(optimized, run_dir, capsys):
    args = ["fit", f"--data.streaming_dir={optimized}", "--model.weights=null", "--trainer.accelerator=cpu"]
    assert "--data.image_size" in one_error_line([*args, "--data.image_size=16"], capsys)  # 32x32 stored: too large
    assert "sampler" in one_error_line([*args, "--data.class_balance=sampler"], capsys)
    written = write_tagged_images(run_dir / "tagged", 24)
    (run_dir / "tags.csv").write_text("file,tags\n" + "".join(f"{f},{' '.join(t)}\n" for f, t in written))
    optimize(f"--data.labels_file={run_dir / 'tags.csv'}", "--data.val_size=4", f"--output={run_dir / 'tagged-set'}",
             f"--data.cache_dir={run_dir / 'cache'}")  # fmt: skip
    assert json.loads((run_dir / "tagged-set" / INFO_FILE).read_text())["task"] == "multilabel"
    multilabel = ["fit", f"--data.streaming_dir={run_dir / 'tagged-set'}", "--model.weights=null"]
    assert "several labels" in one_error_line([*multilabel, "--model.task=multiclass"], capsys)
    assert not list(run_dir.rglob("*.ckpt"))


def test_optimize_refuses_a_used_output_and_leaves_nothing_when_an_image_is_broken(
    image_folder, optimized, s3_endpoint, tmp_path, capsys
):
    source = [f"--data.data_dir={image_folder}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.val_size=20"]
    assert "already exists" in one_error_line(["optimize", *source, f"--output={optimized}"], capsys)
    broken = tmp_path / "broken"
    for path in image_folder.rglob("*.png"):
        target = broken / path.relative_to(image_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    damaged = broken / "train" / "dog" / "00003.png"
    damaged.write_bytes(damaged.read_bytes()[:200])  # the header reads, the pixels do not
    source[0] = f"--data.data_dir={broken}"
    storage = f"--data.storage_options={json.dumps({'endpoint_url': s3_endpoint})}"
    for output in (tmp_path / "out" / "data", "s3://photos/broken"):
        error = one_error_line(["optimize", *source, f"--output={output}", storage, CHUNKS], capsys)
        assert "00003.png" in error and "skip_bad_images" in error
    assert not list((tmp_path / "out").iterdir())
    import boto3

    left = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="photos", Prefix="broken")
    assert left.get("KeyCount") == 0


@pytest.mark.slow  # 14 s: two DDP processes
def test_frozen_features_of_a_stream_are_computed_by_both_processes_and_gathered(optimized, tmp_path):
    """Frozen backbone, two CPU processes (DDP): each computes the features of its share of the training and
    validation streams, the shares are gathered, and the stored file holds every training image once, with its
    label: the same rows as the backbone of the saved checkpoint gives for the stream read in this process."""
    config = Path(__file__).resolve().parents[2] / "configs" / "feature_extractor_sgd.yaml"
    log = run_cli("fit", f"--config={config}", f"--data.streaming_dir={optimized}", "--data.batch_size=16",
                  f"--data.cache_dir={tmp_path / 'cache'}", "--model.weights=null", "--trainer.accelerator=cpu",
                  "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=1",
                  "--trainer.enable_progress_bar=false", "--seed_everything=0", cwd=tmp_path)  # fmt: skip
    assert "Frozen-feature cache: features of 120 images ready" in log
    assert "the test split streams, so it is tested on its images" in log
    files = sorted((tmp_path / "cache" / "features").glob("*.pt"), key=lambda path: path.stat().st_size)
    stored = torch.load(files[-1], weights_only=True)  # the larger file: 100 training images, 20 validation
    assert stored["features"].shape[0] == 100
    assert torch.bincount(stored["labels"]).tolist() == [25, 25, 25, 25]

    from transfer_lightning.model import TransferClassifier

    model = TransferClassifier.load_from_checkpoint(
        tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights=None
    ).eval()
    data = ImageFolderDataModule(
        streaming_dir=str(optimized), cache_dir=str(tmp_path / "here"), normalization="reference"
    )
    data.setup("fit")
    share = data.source.share("train", 0, 0)
    with torch.no_grad():
        expected = torch.cat([model.classifier_inputs(data.batch_transform(batch, train=False))
                              for batch, _ in share.batches(50)])  # fmt: skip
    expected_labels = share.labels
    # Match rows by nearest neighbour: the gathered order is rank by rank, this one the stream's. Other batch sizes
    # give other last bits (oneDNN), so rows agree to 1% of their length; different images are 7% or more apart.
    distances = torch.cdist(stored["features"].float(), expected.float())
    nearest = distances.argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(100))  # a bijection: every image once
    assert float(distances.min(dim=1).values.max()) < 0.01 * float(expected.norm(dim=1).mean())
    assert torch.equal(stored["labels"], expected_labels[nearest])


@pytest.mark.parametrize(
    "module, args, extra",
    [
        ("litdata", ["fit", "--data.streaming_dir=somewhere", "--model.weights=null"], "stream"),
        ("litdata", ["optimize", "--data.data_dir=photos", "--output=out"], "stream"),
        ("pyarrow", ["fit", "--data.parquet=train.parquet", "--model.weights=null"], "parquet"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(module, args, extra, run_dir, capsys, monkeypatch):
    (run_dir / "train.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # importing it fails, as if it were not installed
    monkeypatch.setitem(sys.modules, f"{module}.parquet", None)
    assert f".[{extra}]" in one_error_line(args, capsys)


def test_a_frozen_lbfgs_head_over_a_stream_trains_on_features_computed_once(optimized, run_dir, caplog):
    """The frozen-feature cache reads the streams (and their mirror images) once into the feature store; the L-BFGS
    head trains on them, and a second run with another L2 strength reuses them, labels and all."""
    recipe = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "frozen_lbfgs.yaml"
    args = ["fit", f"--config={recipe}", f"--data.streaming_dir={optimized}", f"--data.cache_dir={run_dir / 'c'}",
            "--data.image_size=null", "--model.backbone=resnet18", "--model.weights=null", "--trainer.max_epochs=1",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--feature_cache.engine=torch"]  # fmt: skip
    first = TransferLightningCLI(args=[*args, "--model.lbfgs_l2=[0.001, 0.001]"])
    assert first.trainer.callback_metrics["test/acc"] > 0.5  # 4 colour classes: chance is 0.25
    stored = [torch.load(path, weights_only=True) for path in (run_dir / "c" / "features").glob("*.pt")]
    assert sorted(len(item["features"]) for item in stored) == [20, 100, 100]  # val, train, train mirrored
    model, share = first.model.eval(), first.datamodule.source.share("train", 0, 0)
    with torch.no_grad():
        expected = torch.cat([model.classifier_inputs(first.datamodule.batch_transform(images, train=False))
                              for images, _ in share.batches(50)])  # fmt: skip
    train = [item for item in stored if item["features"].shape == expected.shape
             and torch.allclose(item["features"], expected, rtol=1e-3, atol=1e-4)]  # fmt: skip
    assert len(train) == 1 and torch.equal(train[0]["labels"], share.labels)  # in the stream's order, one file
    caplog.clear()
    second = TransferLightningCLI(args=[*args, "--model.lbfgs_l2=[0.0001, 0.0001]"])
    assert caplog.text.count("reusing the stored features") == 3
    assert second.trainer.callback_metrics["test/acc"] > 0.5


def test_ctrl_c_during_optimize_leaves_nothing(image_folder, s3_endpoint, tmp_path, monkeypatch):
    """Ctrl+C while the test split is being written (train's 100 and val's 20 images already are, and uploaded):
    no folder, no temporary folder, no object is left."""
    encode, calls = optimizing.encode_sample, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 130:
            raise KeyboardInterrupt
        return encode(*args, **kwargs)

    monkeypatch.setattr(optimizing, "encode_sample", interrupted)
    storage = f"--data.storage_options={json.dumps({'endpoint_url': s3_endpoint})}"
    for output in (tmp_path / "out" / "data", "s3://photos/interrupted"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            main(["optimize", f"--data.data_dir={image_folder}", "--data.val_size=20", storage, f"--output={output}",
                  f"--data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    assert not list((tmp_path / "out").iterdir())
    import boto3

    left = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="photos", Prefix="interrupted")
    assert left.get("KeyCount") == 0
