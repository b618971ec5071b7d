"""Labels from a CSV or TSV table: every accepted format, every bad row, and the splits it gives."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import CLASSES, class_images, write_image_folder
from transfer_lightning.commands.main import main
from transfer_lightning.data import ImageFolderDataModule
from transfer_lightning.data.splits import iterative_stratified_split
from transfer_lightning.data.tables import find_label_delimiter, read_label_table
from transfer_lightning.errors import UserInputError


def write_images(folder: Path, names: list[str]) -> None:
    """One small PNG (or JPEG, by the name's extension) per name, coloured by its index."""
    generator = torch.Generator().manual_seed(0)
    for index, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = class_images(index % 4, 1, generator, size=16)[0].permute(1, 2, 0).numpy()
        Image.fromarray(image).save(path)


def module(tmp_path: Path, table: Path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"val_size": 2, "cache_dir": str(tmp_path / "cache")} | kwargs
    return ImageFolderDataModule(data_dir=str(table.parent), labels_file=str(table), **kwargs)


IMAGES = [f"img{i}.png" for i in range(8)]
LABELS = ["cat", "dog", "cat", "dog", "frog", "cat", "frog", "dog"]


def table_text(separator: str = ",", quote: bool = False) -> str:
    rows = [("file", "label"), *zip(IMAGES, LABELS, strict=True)]
    if quote:
        rows = [tuple(f'"{field}"' for field in row) for row in rows]
    return "\n".join(separator.join(row) for row in rows) + "\n"


@pytest.mark.parametrize(
    "name, content",
    [
        ("labels.csv", table_text().encode()),
        ("labels.tsv", table_text("\t").encode()),
        ("labels.txt", table_text(";").encode()),  # a semicolon-separated export (German Excel)
        ("labels.csv", b"\xef\xbb\xbf" + table_text().encode()),  # UTF-8 with a byte-order mark
        ("labels.csv", table_text().replace("\n", "\r\n").encode()),  # Windows line ends
        ("labels.csv", table_text(quote=True).encode()),
    ],
    ids=["csv", "tsv", "semicolons", "bom", "crlf", "quoted"],
)
def test_every_table_format_gives_the_same_labels(name, content, tmp_path):
    write_images(tmp_path, IMAGES)
    (tmp_path / name).write_bytes(content)
    table = read_label_table(tmp_path / name)
    assert table.class_names == ["cat", "dog", "frog"] and not table.multilabel
    assert [row.file for row in table.rows] == IMAGES
    assert [table.class_names[row.label] for row in table.rows] == LABELS
    assert [row.line for row in table.rows] == list(range(2, 10))  # line numbers as an editor shows them


def test_columns_are_found_by_their_common_names_or_given(tmp_path):
    (tmp_path / "a.csv").write_text("Image_Name,Extra,Class\nx.png,1,cat\ny.png,2,dog\n")
    table = read_label_table(tmp_path / "a.csv")
    assert [row.file for row in table.rows] == ["x.png", "y.png"] and table.class_names == ["cat", "dog"]
    (tmp_path / "b.csv").write_text("picture,what\nx.png,cat\ny.png,dog\n")
    with pytest.raises(UserInputError, match="no file column: its columns are \\['picture', 'what'\\]"):
        read_label_table(tmp_path / "b.csv")
    table = read_label_table(tmp_path / "b.csv", file_column="picture", label_column="what")
    assert [row.label for row in table.rows] == [0, 1]
    with pytest.raises(UserInputError, match="has no column 'kind' \\(data.label_column\\)"):
        read_label_table(tmp_path / "b.csv", file_column="picture", label_column="kind")
    (tmp_path / "c.csv").write_text("file,notes\nx.png,blurry\ny.png,fine\n")
    with pytest.raises(UserInputError, match="has no label column"):
        read_label_table(tmp_path / "c.csv")


def test_numeric_class_names_are_in_numeric_order(tmp_path):
    (tmp_path / "t.csv").write_text("id,target\n" + "".join(f"i{n},{n}\n" for n in (10, 2, 1, 0)))
    assert read_label_table(tmp_path / "t.csv").class_names == ["0", "1", "2", "10"]


@pytest.mark.parametrize("delimiter", [" ", ",", ";", "|"])
def test_each_multilabel_delimiter_is_found(delimiter, tmp_path):
    tags = [["sea", "sunset"], ["sea"], ["beach", "sea", "sunset"], ["beach"]]
    quote = '"' if delimiter == "," else ""
    rows = "".join(f"i{n}.jpg\t{quote}{delimiter.join(t)}{quote}\n" for n, t in enumerate(tags))
    (tmp_path / "t.tsv").write_text("file\ttags\n" + rows)
    table = read_label_table(tmp_path / "t.tsv")
    assert table.multilabel and table.class_names == ["beach", "sea", "sunset"]  # 3, not 6 combinations
    assert [row.label for row in table.rows] == [(0, 1, 1), (0, 1, 0), (1, 1, 1), (1, 0, 0)]
    assert repr(delimiter) in table.how


def test_spaces_in_class_names_are_not_read_as_several_labels(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    values = ["golden retriever", "labrador retriever", "pug", "golden retriever"]
    assert find_label_delimiter(tmp_path / "t.csv", values) is None
    assert "label_delimiter space" in caplog.text  # the log says how to read them otherwise
    assert find_label_delimiter(tmp_path / "t.csv", ["sea sunset", "sea", "sand sea"]) == " "  # "sea" stands alone
    assert find_label_delimiter(tmp_path / "t.csv", ["a b", "a c", "b c", "a b c"]) == " "  # combinations of tags
    with pytest.raises(UserInputError, match="both ';' and ','"):
        find_label_delimiter(tmp_path / "t.csv", ["a;b", "a,c"])
    (tmp_path / "t.csv").write_text("file,label\nx.png,golden retriever\ny.png,pug\nz.png,golden\n")
    forced = read_label_table(tmp_path / "t.csv", label_delimiter="none")
    assert forced.class_names == ["golden", "golden retriever", "pug"] and not forced.multilabel
    split = read_label_table(tmp_path / "t.csv", label_delimiter="space")
    assert split.class_names == ["golden", "pug", "retriever"] and split.multilabel


def test_one_hot_columns(tmp_path):
    (tmp_path / "multi.csv").write_text("image_id,healthy,rust,scab\na,1,0,0\nb,0,1,1\nc,0,0,0\n")
    table = read_label_table(tmp_path / "multi.csv")
    assert table.multilabel and table.class_names == ["healthy", "rust", "scab"]
    assert [row.label for row in table.rows] == [(1, 0, 0), (0, 1, 1), (0, 0, 0)]
    (tmp_path / "single.csv").write_text("image_id,healthy,rust,scab\na,1,0,0\nb,0,0,1\nc,0,1,0\n")
    table = read_label_table(tmp_path / "single.csv")  # exactly one 1 per row: one class per image
    assert not table.multilabel and [row.label for row in table.rows] == [0, 2, 1]
    given = read_label_table(tmp_path / "multi.csv", label_column=["rust", "scab"])
    assert given.class_names == ["rust", "scab"] and [row.label for row in given.rows] == [(0, 0), (1, 1), (0, 0)]


def test_files_without_or_with_another_extension_are_found_by_stem(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    write_images(tmp_path / "images", ["a.jpg", "b.png", "sub/c.png", "d.png", "e.png", "f.png"])
    (tmp_path / "t.csv").write_text("id,label\na,cat\nb.jpg,dog\nsub/c.png,cat\nd,dog\ne.png,cat\nf,dog\n")
    datamodule = module(tmp_path, tmp_path / "t.csv", images_dir=str(tmp_path / "images"))
    samples = datamodule.source.resolved.samples[None]
    assert [Path(path).relative_to(tmp_path / "images").as_posix() for path, _ in samples] == [
        "a.jpg", "b.png", "sub/c.png", "d.png", "e.png", "f.png",
    ]  # fmt: skip
    assert "4 rows named their file without its extension (or with another): found by stem" in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "file,label\n" + "".join(f"nothing{i}.png,cat\n" for i in range(7)) + "img0.png,dog\n",
            r"7 row\(s\) of .*t.csv name a file that is not an image file under .*: line 2 \('nothing0.png'\), "
            r"line 3 .* line 6 \('nothing4.png'\) and 2 more\. .*skip_bad_images",
        ),
        ("file,label\nimg0.png,cat\nimg1.png,\nimg2.png,dog\n", r"1 row\(s\) of .* have an empty label: line 3"),
        (
            "file,label\nimg0.png,cat\nimg1.png,dog\n./img0.png,dog\n",
            r"name an image that an earlier row names too: line 4 \('./img0.png', also on line 2\)",
        ),
        (
            "file,label,split\nimg0.png,cat,train\nimg1.png,dog,holdout\n",
            r"split that is not train, val or test: line 3",
        ),
        ("file,label\nimg0.png,cat\nimg1.png,dog,extra\n", r"another number of fields than the header's 2"),
        ("file,a,b\nimg0.png,1,0\nimg1.png,yes,1\n", r"has no label column"),  # not all 0/1: no one-hot table
        ("file,label\n", r"has a header but no rows"),
        ("file,label\nimg0.png,cat\nimg1.png,cat\n", r"names 1 class"),
    ],
    ids=["missing", "empty-label", "duplicate", "bad-split", "ragged", "not-one-hot", "no-rows", "one-class"],
)
def test_each_bad_row_is_one_clear_error(content, message, tmp_path):
    write_images(tmp_path, IMAGES)
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(UserInputError, match=message):
        module(tmp_path, tmp_path / "t.csv")


def test_a_bad_table_through_the_cli_is_one_line_and_writes_nothing(tmp_path, run_dir, capsys):
    write_images(tmp_path, IMAGES)
    (tmp_path / "t.csv").write_text("file,label\nimg0.png,cat\nimg1.png,dog\nmissing.png,dog\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--data.labels_file={tmp_path / 't.csv'}", "--model.weights=null", "--trainer.fast_dev_run=true"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: 1 row(s) of") and "line 4 ('missing.png')" in error and "\n" not in error
    assert not (run_dir / "lightning_logs").exists()
    with pytest.raises(SystemExit):
        main(["fit", "--data.labels_file=nowhere.csv", "--model.weights=null"])
    assert "data.labels_file nowhere.csv does not exist" in capsys.readouterr().err


def test_skip_bad_images_skips_and_lists_missing_and_undecodable_files(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    write_images(tmp_path, IMAGES)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = "".join(f"{name},{label}\n" for name, label in zip(IMAGES, LABELS, strict=True))
    (tmp_path / "t.csv").write_text("file,label\n" + rows + "gone.png,cat\nbroken.png,dog\n")
    datamodule = module(tmp_path, tmp_path / "t.csv", skip_bad_images=True)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert len(datamodule.train_set) + len(datamodule.val_set) == len(IMAGES)
    assert "Skipped 1 rows whose file is not an image" in caplog.text and "line 10: gone.png" in caplog.text
    assert "broken.png" in caplog.text and "do not decode" in caplog.text
    assert "t.csv: 10 rows; train 6 images, 3 classes; val 2 images, 2 classes; test 2 images" in caplog.text


def test_a_split_column_decides_the_splits(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    write_images(tmp_path, IMAGES)
    splits = ["train", "TRAIN", "Validation", "train", "test", "train", "val", "test"]
    rows = "".join(f"{n},{c},{s}\n" for n, c, s in zip(IMAGES, LABELS, splits, strict=True))
    (tmp_path / "t.csv").write_text("file,label,split\n" + rows)
    datamodule = module(tmp_path, tmp_path / "t.csv")
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (4, 2, 2)
    assert datamodule.val_set.labels.tolist() == [0, 2]  # img2 (cat) and img6 (frog), in row order
    assert "test = t.csv (test rows) (2 images)" in caplog.text


def test_without_a_test_split_the_log_says_val_also_tests(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    write_images(tmp_path, IMAGES)
    (tmp_path / "t.csv").write_text(table_text())
    datamodule = module(tmp_path, tmp_path / "t.csv", val_size=3)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert "test = the val images (no test rows in" in caplog.text
    assert sorted(datamodule.val_set.labels.tolist()) == [0, 1, 2]  # stratified: one of each class


def test_a_table_of_an_image_folder_gives_the_very_same_data(tmp_path):
    """The CSV route and the folder route read the same images in the same order, so everything downstream
    (splits, features, training) is the same; docs/results.md measures it on real CIFAR-10."""
    folder = write_image_folder(tmp_path / "folder", train_per_class=6, test_per_class=2)
    rows = [
        f"{split}/{name}/{path.name},{name},{split}"
        for split in ("train", "test")
        for name in CLASSES
        for path in sorted((folder / split / name).iterdir())
    ]
    (tmp_path / "labels.csv").write_text("file,label,split\n" + "\n".join(rows) + "\n")
    by_folder = ImageFolderDataModule(str(folder), cache_dir=str(tmp_path / "cache"), val_size=4)
    by_table = ImageFolderDataModule(
        str(folder), labels_file=str(tmp_path / "labels.csv"), cache_dir=str(tmp_path / "cache"), val_size=4
    )
    for datamodule in (by_folder, by_table):
        datamodule.prepare_data()
        datamodule.setup("fit")
    assert by_table.class_names == by_folder.class_names == CLASSES
    for split in ("train_set", "val_set", "test_set"):
        table_images, table_labels = getattr(by_table, split).to_arrays()
        folder_images, folder_labels = getattr(by_folder, split).to_arrays()
        assert torch.equal(table_images, folder_images) and torch.equal(table_labels, folder_labels)


def test_iterative_stratification_puts_every_label_in_validation():
    generator = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.5, 0.3, 0.1, 0.02, 0.006, 0.003])
    labels = (torch.rand(1000, 6, generator=generator) < rates).long()
    labels[:, 5] = 0
    labels[[10, 500], 5] = 1  # the rarest class has two images
    train, val = iterative_stratified_split(labels, 100, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(1000)) and abs(len(val) - 100) <= 3
    assert (labels[val].sum(dim=0) >= 1).all()  # every class, the rarest too, has an image in validation
    ratio = labels[val].sum(dim=0)[:3].double() / labels.sum(dim=0)[:3]
    assert torch.allclose(ratio, torch.full((3,), 0.1, dtype=torch.double), atol=0.02)  # proportional
    assert torch.equal(val, iterative_stratified_split(labels, 100, seed=0)[1])
    assert not torch.equal(val, iterative_stratified_split(labels, 100, seed=1)[1])
