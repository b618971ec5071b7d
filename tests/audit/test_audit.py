"""audit: a wrong label, an exact and a re-encoded duplicate across splits and an outlier, planted in a synthetic
photo folder, each come first in their file; and the one-line errors."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from transfer_lightning.commands.main import main

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def picture(colour: str, generator: torch.Generator) -> Image.Image:
    """A 48x48 photo of a class's colour under a pattern of its own (smooth random shapes, so images differ)."""
    pattern = F.interpolate(torch.rand(1, 3, 4, 4, generator=generator), size=48, mode="bilinear")[0]
    pixels = torch.tensor(COLOURS[colour]).view(3, 1, 1) * 0.6 + pattern * 100
    return Image.fromarray(pixels.clamp(0, 255).byte().permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """train/ and test/ class folders, with a red photo filed as green, a red photo copied byte for byte into test,
    a blue photo re-encoded as JPEG into test, and black-and-white speckles filed as red."""
    root = tmp_path_factory.mktemp("planted")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 15), ("test", 5)):
        for colour in COLOURS:
            (root / split / colour).mkdir(parents=True)
            for index in range(count):
                picture(colour, generator).save(root / split / colour / f"{index:03d}.png")
    picture("red", generator).save(root / "train" / "green" / "planted_red.png")
    shutil.copy(root / "train" / "red" / "003.png", root / "test" / "red" / "copy_of_003.png")
    Image.open(root / "train" / "blue" / "004.png").save(root / "test" / "blue" / "reencoded_004.jpg", quality=85)
    speckles = (torch.rand(48, 48, generator=generator) < 0.5) * 255  # black and white pixels: like no photo
    Image.fromarray(speckles.byte().numpy()).convert("RGB").save(root / "train" / "red" / "speckles.png")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), root / "weights.pth")
    return root


def audit(planted: Path, output: Path, *extra: str) -> None:
    main(
        [
            "audit",
            f"--data.data_dir={planted}",
            f"--data.cache_dir={output.parent / 'cache'}",
            f"--model.weights={planted / 'weights.pth'}",
            "--data.image_size=32",
            "--data.val_size=0.2",
            "--trainer.accelerator=cpu",
            f"--output={output}",
            "--folds=3",
            "--near=0.97",  # random weights' features find images of one colour alike; real ones: docs/guides/audit.md
            *extra,
        ]
    )


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_each_planted_problem_comes_first_in_its_file(planted, tmp_path, capsys):
    audit(planted, tmp_path / "audit")
    labels = rows(tmp_path / "audit" / "label_issues.csv")
    assert len(labels) == 3 * 20 + 4  # every image of every split, once
    # The red photo filed as green, and the speckles filed as red (like no class): the two lowest label qualities.
    planted = next(row for row in labels[:2] if row["path"] == "train/green/planted_red.png")
    assert (planted["given_label"], planted["suggested_label"], planted["is_issue"]) == ("green", "red", "true")
    assert {row["path"] for row in labels[:2]} == {"train/green/planted_red.png", "train/red/speckles.png"}
    assert sum(row["is_issue"] == "true" for row in labels) <= 3  # not every image of a class
    duplicates = rows(tmp_path / "audit" / "duplicates.csv")
    assert (duplicates[0]["path_a"], duplicates[0]["path_b"], duplicates[0]["kind"]) == (
        "train/red/003.png",
        "test/red/copy_of_003.png",
        "exact",
    )
    near = [row for row in duplicates if row["kind"] == "near"]
    assert {near[0]["path_a"], near[0]["path_b"]} == {"train/blue/004.png", "test/blue/reencoded_004.jpg"}
    assert {near[0]["split_a"], near[0]["split_b"]} == {"train", "test"}  # a leak: listed before pairs within a split
    outliers = rows(tmp_path / "audit" / "outliers.csv")
    assert outliers[0]["path"] == "train/red/speckles.png" and outliers[0]["is_outlier"] == "true"
    summary = capsys.readouterr().out
    assert "Leaks across splits (train/val/test pairs of duplicates): 2" in summary and "Likely wrong labels" in summary
    page = (tmp_path / "audit" / "audit.html").read_text()
    leaks, labels_section, outliers_section = (
        page.index("<h2>Leaks"),
        page.index("<h2>Likely wrong labels"),
        page.index("<h2>Outliers"),
    )
    assert leaks < page.index("copy_of_003.png") < page.index("reencoded_004.jpg") < labels_section
    assert labels_section < page.index("planted_red.png") < outliers_section < page.rindex("speckles.png")
    assert page.count("data:image/png;base64,") >= 2 * 2 + 2 + 1  # two pairs, two labels, an outlier


def test_several_labels_per_image_from_a_table(planted, tmp_path):
    """A multi-label table: each image's tags joined by ';'; the image whose tags were swapped for their
    opposites comes first."""
    from tests.conftest import write_tagged_table

    table = write_tagged_table(tmp_path / "tagged", train=60, val=15, test=15)
    lines = table.read_text().splitlines()
    name, tags, split = lines[5].split(",")
    everything = {tag for row in lines[1:] for tag in row.split(",")[1].split()}
    opposite = " ".join(sorted(everything - set(tags.split())))
    lines[5] = f"{name},{opposite},{split}"
    table.write_text("\n".join(lines) + "\n")
    main(
        [
            "audit",
            f"--data.labels_file={table}",
            f"--data.images_dir={table.parent / 'images'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--model.weights={planted / 'weights.pth'}",
            "--trainer.accelerator=cpu",
            f"--output={tmp_path / 'audit'}",
            "--folds=3",
        ]
    )
    labels = rows(tmp_path / "audit" / "label_issues.csv")
    assert len(labels) == 90
    assert labels[0]["path"] == name and labels[0]["given_label"] == opposite.replace(" ", ";")
    assert labels[0]["is_issue"] == "true"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--folds=30"], "30 folds need at least 30 images of every class"),
        (["--folds=1"], "--folds must be at least 2"),
        (["--model.weights=null"], "--model.weights is null"),
        (["--near=1.5"], "--near, --near_pixels and --near_both are cosine similarities"),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(planted, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        audit(planted, tmp_path / "audit", *extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "audit").exists()


def test_without_cleanlab_the_extra_is_named(planted, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "cleanlab" else real(name))
    with pytest.raises(SystemExit):
        audit(planted, tmp_path / "audit")
    assert "install the audit extra" in capsys.readouterr().err


def test_a_frozen_fit_after_the_audit_reuses_its_features(planted, tmp_path, caplog):
    """The audit stores the features as the frozen-feature cache does: the fit after it computes none."""
    import logging

    audit(planted, tmp_path / "audit")
    caplog.set_level(logging.INFO)
    main(
        [
            "fit",
            f"--data.data_dir={planted}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--model.weights={planted / 'weights.pth'}",
            "--data.image_size=32",
            "--data.val_size=0.2",
            "--model.freeze_backbone=true",
            "--trainer.max_epochs=1",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    reused = [line for line in caplog.text.splitlines() if "reusing the stored features" in line]
    assert len(reused) == 2 and "Caching frozen features" not in caplog.text  # train and val, both stored


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_renders_in_chromium(planted, tmp_path):
    """Headless Chromium draws the page: its thumbnails decode (the screenshot is not blank, and has the colours of
    the planted photos)."""
    import subprocess

    audit(planted, tmp_path / "audit")
    shot = tmp_path / "audit.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1500",
         f"--screenshot={shot}", (tmp_path / "audit" / "audit.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = torch.from_numpy(np.asarray(Image.open(shot).convert("RGB"))).float()
    assert pixels.std() > 20  # not a blank page
    reddish = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 150)
    assert reddish.sum() > 1000  # the red photos' thumbnails are drawn


def test_cifar10_batches_are_named_by_their_position(planted, tmp_path):
    """CIFAR-10's own batches have no files: an image is named by its split and position (as the PNG copies' files);
    a test image copied into the training batches is an exact duplicate across splits."""
    import pickle

    from tests.conftest import write_cifar10_batches

    root = write_cifar10_batches(tmp_path / "cifar")
    batches = root / "cifar-10-batches-py"
    test = pickle.loads((batches / "test_batch").read_bytes())
    first = pickle.loads((batches / "data_batch_1").read_bytes())
    first["data"][3] = test["data"][7]
    (batches / "data_batch_1").write_bytes(pickle.dumps(first))
    main(
        [
            "audit",
            f"--data.data_dir={root}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--model.weights={planted / 'weights.pth'}",
            "--data.val_size=0.2",
            "--trainer.accelerator=cpu",
            f"--output={tmp_path / 'audit'}",
            "--folds=3",
        ]
    )
    exact = [row for row in rows(tmp_path / "audit" / "duplicates.csv") if row["kind"] == "exact"]
    assert [{row["path_a"], row["path_b"]} for row in exact] == [{"train 00003", "test 00007"}]


def test_paths_are_relative_to_a_relative_data_dir_too(planted, tmp_path, monkeypatch):
    monkeypatch.chdir(planted.parent)
    main(
        [
            "audit",
            f"--data.data_dir={planted.name}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--model.weights={planted / 'weights.pth'}",
            "--data.image_size=32",
            "--data.val_size=0.2",
            "--trainer.accelerator=cpu",
            f"--output={tmp_path / 'audit'}",
            "--folds=3",
        ]
    )
    paths = {row["path"] for row in rows(tmp_path / "audit" / "label_issues.csv")}
    assert "train/green/planted_red.png" in paths and all(path.startswith(("train/", "test/")) for path in paths)
