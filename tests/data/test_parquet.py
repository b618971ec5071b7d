"""Parquet data sets as the Hugging Face Hub writes them, and the Hub's imagefolder metadata files as label tables."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import class_images
from transfer_lightning.commands.main import main
from transfer_lightning.data import ImageFolderDataModule

pa = pytest.importorskip("pyarrow", reason="the parquet extra is not installed")
pq = pytest.importorskip("pyarrow.parquet")

#: Class names in the metadata's order, which is not sorted: labels must be mapped by name, not by position.
HUB_NAMES = ["ship", "cat", "frog", "dog"]
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()[:16]


def png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_hub_parquet(path: Path, per_class: int, seed: int, multilabel: bool = False, **columns) -> dict[str, object]:
    """A Parquet file in the Hub's layout (an Image feature, a ClassLabel label, or a list of them) of the colour
    classes; returns each image's digest -> its class name (or set of names)."""
    generator = torch.Generator().manual_seed(seed)
    images, labels, truth = [], [], {}
    for label in range(len(HUB_NAMES)):
        for i, image in enumerate(class_images(label, per_class, generator)):
            value = [label, (label + 1) % 4] if multilabel and i % 2 else [label] if multilabel else label
            images.append({"bytes": png_bytes(image), "path": f"{i}.png"})
            labels.append(value)
            truth[digest(image)] = {HUB_NAMES[v] for v in value} if multilabel else HUB_NAMES[value]
    class_label = {"names": HUB_NAMES, "_type": "ClassLabel"}
    label_feature = {"feature": class_label, "_type": "Sequence"} if multilabel else class_label
    features = {"img": {"_type": "Image"}, "label": label_feature}
    label_type = pa.list_(pa.int64()) if multilabel else pa.int64()
    data = {"img": images, "label": labels, **columns}
    schema = pa.schema([("img", IMAGE_TYPE), ("label", label_type)] + [(k, pa.string()) for k in columns],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data, schema=schema), path)
    return truth


def labelled_images(datamodule: ImageFolderDataModule) -> list[tuple[str, object]]:
    """(digest, class name or set of names) of every image of the three splits, from the decoded store."""
    names = datamodule.class_names
    rows = []
    for dataset in (datamodule.train_set, datamodule.val_set, datamodule.test_set):
        images, labels = dataset.to_arrays()
        for image, label in zip(images, labels, strict=True):
            named = {names[i] for i in torch.nonzero(label).flatten().tolist()} if label.ndim else names[int(label)]
            rows.append((digest(image), named))
    return rows


def test_hub_parquet_splits_by_file_name_and_names_classes_from_the_metadata(tmp_path):
    truth = write_hub_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", 12, seed=0)
    truth |= write_hub_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", 8, seed=1)
    truth |= write_hub_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", 5, seed=2)
    data = ImageFolderDataModule(parquet=str(tmp_path / "data" / "*.parquet"), val_size=16,
                                 cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    assert sorted(data.class_names) == sorted(HUB_NAMES) and data.task == "multiclass"
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (64, 16, 20)
    seen = labelled_images(data)
    assert len({image for image, _ in seen}) == 100  # every row once, across the splits
    assert all(truth[image] == named for image, named in seen)
    test_images = {digest(image) for image in data.test_set.to_arrays()[0]}
    generator = torch.Generator().manual_seed(2)
    assert test_images == {digest(image) for label in range(4) for image in class_images(label, 5, generator)}


def test_multilabel_parquet_is_a_multilabel_task(tmp_path):
    truth = write_hub_parquet(tmp_path / "train.parquet", 10, seed=0, multilabel=True)
    data = ImageFolderDataModule(parquet=str(tmp_path / "train.parquet"), val_size=8, cache_dir=str(tmp_path / "c"))
    data.prepare_data()
    data.setup("fit")
    assert data.task == "multilabel"
    assert all(truth[image] == named for image, named in labelled_images(data))


@pytest.mark.parametrize(
    "columns, problem",
    [
        ({"label": [0], "note": ["a"]}, "has no image column"),
        ({"img": [{"bytes": b"x", "path": "a.png"}], "note": ["a"]}, "has no label"),
    ],
)
def test_a_parquet_file_without_its_columns_is_one_line_and_leaves_nothing(tmp_path, capsys, columns, problem):
    pq.write_table(pa.table(columns), tmp_path / "train.parquet")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--data.parquet={tmp_path / 'train.parquet'}", f"--data.cache_dir={tmp_path / 'cache'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and problem in errors[0] and "Traceback" not in err
    assert not list((tmp_path / "cache" / "parquet").iterdir())


def test_unlabelled_rows_are_refused(tmp_path):
    write_hub_parquet(tmp_path / "test.parquet", 2, seed=0)
    table = pq.read_table(tmp_path / "test.parquet")
    labels = pa.array([-1] * table.num_rows, pa.int64())
    pq.write_table(table.set_column(1, "label", labels), tmp_path / "test.parquet")
    with pytest.raises(Exception, match="has no label"):
        ImageFolderDataModule(parquet=str(tmp_path / "test.parquet"), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_hub_imagefolder_metadata_is_a_label_table(tmp_path, suffix):
    """The Hub's imagefolder layout: images and a metadata.csv / metadata.jsonl with a file_name column."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for label, name in enumerate(HUB_NAMES):
        for i, image in enumerate(class_images(label, 6, generator)):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{name}{i}.png")
            rows.append({"file_name": f"{name}{i}.png", "label": name})
    if suffix == "csv":
        lines = ["file_name,label"] + [f"{row['file_name']},{row['label']}" for row in rows]
    else:
        lines = [json.dumps(row) for row in rows]
    (tmp_path / f"metadata.{suffix}").write_text("\n".join(lines) + "\n")
    data = ImageFolderDataModule(labels_file=str(tmp_path / f"metadata.{suffix}"), val_size=8,
                                 cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    assert sorted(data.class_names) == sorted(HUB_NAMES) and len(data.train_set) + len(data.val_set) == 24


def test_a_parquet_set_optimizes_into_a_stream_with_its_splits_and_names(tmp_path):
    pytest.importorskip("litdata", reason="the stream extra is not installed")
    from transfer_lightning.data.streaming import INFO_FILE, open_split

    truth = write_hub_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", 10, seed=0)
    truth |= write_hub_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", 3, seed=1)
    output = tmp_path / "optimized"
    main(["optimize", f"--data.parquet={tmp_path / 'data'}", "--data.val_size=8", "--encoding=raw",
          f"--data.cache_dir={tmp_path / 'cache'}", f"--output={output}"])  # fmt: skip
    info = json.loads((output / INFO_FILE).read_text())
    assert info["split_sizes"] == {"train": 32, "val": 8, "test": 12} and sorted(info["class_names"]) == sorted(
        HUB_NAMES
    )
    names = info["class_names"]
    for split in ("train", "val", "test"):
        for image, label in open_split(str(output), split, False, 0, "1GB", None, tmp_path / "chunks"):
            assert truth[digest(image)] == names[int(label)]
