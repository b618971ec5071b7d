"""Writing a data set once into LitData's optimized chunks, locally or to object storage (``optimize``).

The splits are those the data module makes of the same source (:func:`~transfer_lightning.data.splits.make_splits`),
every image is resized to the stored size as the local store does, encoded
(JPEG at a stated quality, or raw pixels), and the items of each split are shuffled with a seed before LitData
writes them (its workers read whole chunks, so a chunk should hold a mix of classes). One process per core, or
this process alone when the first images say that the split takes less than the workers' start-up.

Nothing half-written is left: a local data set is written under a temporary name and renamed into place; on
object storage :data:`~transfer_lightning.data.streaming.INFO_FILE` is written last and anything written is
deleted again if writing fails or is interrupted.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchvision.io import encode_jpeg

from transfer_lightning.data.datasets import class_counts
from transfer_lightning.data.source import Sample
from transfer_lightning.data.storage import describe_storage_error, is_remote, require_litdata, storage_provider
from transfer_lightning.data.store import DECODE_ERRORS, decode_image
from transfer_lightning.data.streaming import INFO_FILE, StreamInfo, split_dir
from transfer_lightning.data.transforms import Decoding
from transfer_lightning.data.workers import POOL_MIN_SECONDS
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import temporary_path
from transfer_lightning.logs import progress_bar

#: Images encoded here first, to estimate whether worker processes would finish sooner.
PROBE_IMAGES = 32


def encode_sample(
    sample: Sample, decoding: Decoding, encoding: str, quality: int, failures_dir: str
) -> dict[str, Any] | None:
    """One item of an optimized data set: the image at the stored ``size`` (as the local store decodes it),
    JPEG bytes or raw uint8 pixels, and its label. A file that does not decode is noted in ``failures_dir``
    (LitData's workers cannot return it) and left out."""
    source, label = sample
    try:
        pixels = decode_image(source if isinstance(source, str) else io.BytesIO(source), *decoding)
    except DECODE_ERRORS as error:
        shown = source if isinstance(source, str) else "an embedded image"
        with open(Path(failures_dir) / f"{os.getpid()}.txt", "a") as failures:
            failures.write(json.dumps([shown, f"{type(error).__name__}: {error}"]) + "\n")
        return None
    if encoding == "jpeg":
        image: bytes | np.ndarray = (
            encode_jpeg(torch.from_numpy(np.ascontiguousarray(pixels)), quality).numpy().tobytes()
        )
    else:
        image = np.ascontiguousarray(pixels)
    return {"image": image, "label": np.asarray(label, dtype=np.int64) if isinstance(label, tuple) else int(label)}


def read_failures(failures_dir: Path) -> list[tuple[str, str]]:
    """(file, error) of every image the workers could not decode."""
    return [
        tuple(json.loads(line)) for path in sorted(failures_dir.glob("*.txt")) for line in path.read_text().splitlines()
    ]


def write_optimized(
    output: str,
    splits: dict[str, list[Sample]],
    info: StreamInfo,
    num_workers: int,
    chunk_bytes: str,
    storage_options: dict[str, Any] | None,
    skip_bad_images: bool,
    seed: int,
) -> StreamInfo:
    """Write every split under ``output`` (new: see :func:`refuse_existing`) with LitData, then ``info`` (its counts
    as written); nothing is left of it if anything fails or the user interrupts."""
    litdata = require_litdata()
    remote = is_remote(output)
    target = output.rstrip("/") if remote else str(temporary_path(Path(output).expanduser().resolve()))
    finished = False
    skipped: list[tuple[str, str]] = []
    # LitData's optimize sets the process-wide start method (spawn) and leaves it set: later DataLoader workers in
    # this process would be spawned too, each importing torch again every epoch.
    start_method = multiprocessing.get_start_method(allow_none=True)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            for split, samples in splits.items():
                order = list(samples)
                random.Random(seed).shuffle(order)
                failures_dir = Path(scratch) / split
                failures_dir.mkdir()
                started = time.perf_counter()
                encode = functools.partial(
                    encode_sample,
                    decoding=info.decoding,
                    encoding=info.encoding,
                    quality=info.quality or 0,
                    failures_dir=str(failures_dir),
                )
                rank_zero_info(f"Optimizing {len(order)} {split} images into {split_dir(output, split)}")
                probe = [encode(sample) for sample in order[:PROBE_IMAGES]]
                seconds_left = (time.perf_counter() - started) / max(1, len(probe)) * (len(order) - len(probe))
                if num_workers < 2 or seconds_left < POOL_MIN_SECONDS:
                    items = itertools.chain(probe, map(encode, order[len(probe) :]))
                    write_here(items, len(order), Path(scratch) / "chunks" / split, split_dir(target, split),
                               chunk_bytes, storage_options)  # fmt: skip
                else:
                    litdata.optimize(
                        encode,
                        order,
                        split_dir(target, split),
                        chunk_bytes=chunk_bytes,
                        num_workers=min(num_workers, len(order)),
                        start_method="spawn",
                        storage_options=storage_options or {},
                    )
                failures = read_failures(failures_dir)
                if failures and not skip_bad_images:
                    raise UserInputError(
                        f"Cannot decode image {failures[0][0]} ({failures[0][1]}). Remove or replace this file, or "
                        "set --data.skip_bad_images true to leave such files out; nothing was written."
                    )
                info.split_sizes[split] = len(order) - len(failures)
                if split == "train":
                    failed = {path for path, _ in failures}
                    kept = [sample for sample in order if sample[0] not in failed]
                    info.train_class_counts = train_class_counts(kept, len(info.class_names))
                skipped += failures
            if skipped:
                rank_zero_info(f"Left out {len(skipped)} image file(s) that do not decode, e.g. {skipped[0][0]}.")
                info.extra["skipped"] = [path for path, _ in skipped]
            _write_info(target, info, storage_options)
            if not remote:
                os.replace(target, Path(output).expanduser())
            finished = True
        finally:
            multiprocessing.set_start_method(start_method, force=True)
            if not finished:
                _remove(target, storage_options)
    return info


def write_here(
    items: Iterable[dict[str, Any] | None],
    count: int,
    scratch: Path,
    target: str,
    chunk_bytes: str,
    storage_options: dict[str, Any] | None,
) -> None:
    """Write ``items`` with LitData's writer (``Cache``) in this process, the chunks and their index straight into a
    local ``target``, or into ``scratch`` and then uploaded (the index last). For small splits: LitData's
    ``optimize`` starts a process per worker, and each imports torch and this package first (docs/performance.md)."""
    from litdata.streaming import Cache

    folder = scratch if is_remote(target) else Path(target)
    cache = Cache(str(folder), chunk_bytes=chunk_bytes)
    index = 0
    for item in progress_bar(items, total=count, desc="Writing", unit="img"):
        if item is not None:  # a file that does not decode, noted by encode_sample
            cache[index] = item
            index += 1
    cache.done()
    cache.merge()
    if is_remote(target):
        provider = storage_provider(target, storage_options)
        files = sorted(folder.iterdir(), key=lambda path: path.name == "index.json")
        for path in files:
            provider.upload_file(str(path), f"{target}/{path.name}")


def refuse_existing(output: str, storage_options: dict[str, Any] | None) -> None:
    """One line when ``output`` already holds something: a data set is written into a new place only."""
    if is_remote(output):
        try:
            exists = not storage_provider(output, storage_options, patient=False).is_empty(output)
        except Exception as error:  # botocore's and obstore's errors share no base class
            raise UserInputError(describe_storage_error(error, output)) from None
    else:
        path = Path(output).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        exists = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if exists:
        raise UserInputError(
            f"--output {output} already exists and is not empty: remove it, or write the data set elsewhere."
        )


def _write_info(target: str, info: StreamInfo, storage_options: dict[str, Any] | None) -> None:
    if not is_remote(target):
        (Path(target) / INFO_FILE).write_text(info.to_json())
        return
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / INFO_FILE
        local.write_text(info.to_json())
        storage_provider(target, storage_options).upload_file(str(local), f"{target}/{INFO_FILE}")


def _remove(target: str, storage_options: dict[str, Any] | None) -> None:
    """Delete what a failed or interrupted ``optimize`` wrote."""
    if not is_remote(target):
        shutil.rmtree(target, ignore_errors=True)
        return
    try:
        storage_provider(target, storage_options).delete_file_or_directory(target + "/")
    except Exception as error:  # the original error matters more; say what could not be cleaned
        rank_zero_info(f"Could not remove the partial data set at {target}: {describe_storage_error(error, target)}")


def train_class_counts(samples: list[Sample], num_classes: int) -> list[int]:
    labels = torch.tensor([label for _, label in samples])
    return class_counts(labels, num_classes)
