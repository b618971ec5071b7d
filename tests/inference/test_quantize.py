"""export --quantize int8: a smaller file of integer weights, checked against the float file on the validation split
before it is written, and used by predict and serve like any export."""

from __future__ import annotations

import argparse
import base64
import csv
import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto

from tests.conftest import PHOTO_SIZES, fit_photo_run, photo
from transfer_lightning.commands.main import main
from transfer_lightning.data import ImageArrays, ImageTensorDataset
from transfer_lightning.data.transforms import Preprocessing
from transfer_lightning.errors import UserInputError
from transfer_lightning.inference.quantize import QuantizeSettings, has_vnni, quantize_checked
from transfer_lightning.inference.run_images import RunImages
from transfer_lightning.network.onnx import write_onnx
from transfer_lightning.serving.requests import load_model
from transfer_lightning.tasks import create_task

CLASSES = ("ants", "bees", "wasps")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A folder with ``last.ckpt`` of a ResNet18 fitted on mixed-size photos at 32 px (val accuracy well above
    chance), the photos in ``photos/``, and the float export ``float.onnx``."""
    root = tmp_path_factory.mktemp("int8_run")
    fit_photo_run(root, {"train": 14, "val": 6}, CLASSES, "Adam", 0.001, epochs=4)
    main(["export", f"--ckpt_path={root / 'last.ckpt'}", f"--output={root / 'float.onnx'}"])
    return root


@pytest.fixture(scope="module")
def int8_file(run: Path) -> Path:
    output = run / "int8.onnx"
    main(["export", f"--ckpt_path={run / 'last.ckpt'}", f"--output={output}", "--quantize", "int8"])
    return output


def validation_accuracy_by_hand(model_file: Path, photos: Path) -> float:
    """The file's accuracy on the val folder's photos, each prepared as predict and serve prepare it."""
    model = load_model(None, str(model_file), "cpu")
    right = total = 0
    for label, name in enumerate(CLASSES):
        files = sorted((photos / "val" / name).iterdir())
        images = torch.stack([model.prepare(path.read_bytes()) for path in files])
        right += int((model.run(images).probabilities.argmax(1) == label).sum())
        total += len(files)
    return right / total


def test_int8_file_is_smaller_holds_integer_weights_and_agrees_with_the_float_file(run, int8_file):
    float_file = run / "float.onnx"
    assert int8_file.stat().st_size < 0.4 * float_file.stat().st_size  # int8 weights: about a quarter

    graph = onnx.load(str(int8_file)).graph
    int8_weights = [tensor for tensor in graph.initializer if tensor.data_type == TensorProto.INT8 and tensor.dims]
    conv_count = sum(node.op_type == "Conv" for node in graph.node)
    assert len(int8_weights) >= conv_count  # every convolution (and the head) has integer weights
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) >= conv_count

    described = json.loads(Path(f"{int8_file}.json").read_text())
    float_described = json.loads((run / "float.onnx.json").read_text())
    assert set(described) == set(float_described) | {"quantization"}  # the same description, and how it was made
    assert described["classes"] == list(CLASSES) and described["input"] == float_described["input"]
    checked = described["quantization"]["checked"]
    assert checked["images"] == 3 * 9  # 6 photos + gray, alpha and phone per class
    float_accuracy = validation_accuracy_by_hand(float_file, run / "photos")
    assert float_accuracy >= 0.8  # the check compares a model that learned something
    assert checked["float"] == pytest.approx(float_accuracy, abs=1e-6)
    assert checked["int8"] == pytest.approx(validation_accuracy_by_hand(int8_file, run / "photos"), abs=1e-6)
    assert 100 * (checked["float"] - checked["int8"]) <= 1.0
    assert described["quantization"]["calibration"]["images"] == 3 * 17  # every training image (fewer than 256)

    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
    for label in range(3):  # and images like the classes', which the float model tells apart
        images[label::3] = images[label::3] // 4 + (torch.arange(3) == label).view(3, 1, 1).to(torch.uint8) * 160
    got = load_model(None, str(int8_file), "cpu").run(images).probabilities
    expected = load_model(None, str(float_file), "cpu").run(images).probabilities
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9


def test_the_fixes_are_tried_in_turn_then_nothing_is_written(run, capsys):
    """With a limit no recipe meets, every recipe is tried, each keeping what its name says in float; then one
    line, exit 2, and neither the file nor its JSON."""
    import onnxruntime.quantization

    kept: list[list[str]] = []
    seven_bits: list[bool] = []
    original = onnxruntime.quantization.quantize_static

    def recording(*args, **kwargs):
        kept.append(list(kwargs["nodes_to_exclude"]))
        seven_bits.append(kwargs["reduce_range"])
        return original(*args, **kwargs)

    output = run / "refused.onnx"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(onnxruntime.quantization, "quantize_static", recording)
        main(["export", f"--ckpt_path={run / 'last.ckpt'}", f"--output={output}", "--quantize=int8",
              "--max-accuracy-drop=-100"])  # fmt: skip
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: No int8 recipe stays within --max-accuracy-drop -100 points")
    assert "nothing written" in error
    assert not list(run.glob("refused*"))
    # 8-bit (with VNNI only), 7-bit, first conv and head in float, and 5 damaging layers too, percentile calibration
    assert [len(names) for names in kept] == [0] * has_vnni() + [0, 2, 2 + 5, 2]
    assert seven_bits == [False] * has_vnni() + [True] * 4
    kept = kept[has_vnni() :]
    graph = onnx.load(str(run / "float.onnx")).graph
    weighted = [node.name for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    assert kept[1] == [weighted[0], weighted[-1]]  # the first convolution and the head
    assert not set(kept[2][2:]) & set(kept[1])


def test_predict_and_serve_run_the_int8_file_alike(run, int8_file, tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    generator = torch.Generator().manual_seed(9)
    for index in range(6):
        photo(index % 3, PHOTO_SIZES[index], generator).save(new / f"p{index}.jpg", quality=90)
    rows = {}
    for name in ("float", "int8"):
        main(["predict", "--model", str(run / f"{name}.onnx"), f"--data.predict_dir={new}",
              f"--output={tmp_path / name}.csv"])  # fmt: skip
        rows[name] = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
    assert list(rows["int8"][0]) == list(rows["float"][0])  # the same columns
    assert [row["predicted_class"] for row in rows["int8"]] == [row["predicted_class"] for row in rows["float"]]
    # serve's own request handling (LitServe's API class, in this process): the same answers as predict's CSV.
    pytest.importorskip("litserve", reason="the [serve] extra is not installed")
    from transfer_lightning.serving.api import ClassifierAPI

    api = ClassifierAPI(argparse.Namespace(ckpt_path=None, model=str(int8_file), max_image_mb=10, max_megapixels=10,
                                           max_batch_size=1, top_k=3))  # fmt: skip
    api.setup("cpu")
    paths = sorted(new.iterdir())
    request = {"images": [base64.b64encode(path.read_bytes()).decode() for path in paths]}
    answer = api.encode_response(api.predict(api.decode_request(request)))
    for served, row in zip(answer["predictions"], rows["int8"], strict=True):
        assert served["class"] == row["predicted_class"]
        assert served["probability"] == pytest.approx(float(row["probability"]), abs=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format=pt2", "--output=x.pt2"], "--quantize int8 makes ONNX files only: use --format onnx, not pt2."),
        (["--format=hub", "--output=hubdir"], "--quantize int8 makes ONNX files only: use --format onnx, not hub."),
        (["--output=x.onnx", "--calibration-images=8"], "--calibration-images 8 is too few"),
        (["--output=x.onnx", "--data.data_dir=nowhere"], "data.data_dir nowhere does not exist"),
    ],
)
def test_bad_int8_options_are_one_line_errors(extra, message, run, run_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", f"--ckpt_path={run / 'last.ckpt'}", "--quantize=int8", *extra])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not list(run_dir.iterdir())  # nothing written


def test_too_few_training_images_and_a_model_without_weights_to_quantize(tmp_path):
    preprocessing = Preprocessing((8, 8), "resize", None, (0.5,) * 3, (0.5,) * 3)
    few = ImageArrays(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    images = RunImages(ImageTensorDataset(few), ImageTensorDataset(few), preprocessing)
    task = create_task("multiclass", ["a", "b", "c"])
    with pytest.raises(UserInputError, match="The run has 10 training images; int8 calibration needs at least 32"):
        quantize_checked(tmp_path / "unused.onnx", tmp_path / "out.onnx", images, task, QuantizeSettings())

    class ColourMeans(torch.nn.Module):  # no convolution or matrix product: nothing ONNX Runtime quantizes
        def forward(self, images):
            return images.float().mean(dim=(2, 3)).softmax(dim=1)

    model = tmp_path / "means.onnx"
    write_onnx(ColourMeans().eval(), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), model, "images", "probabilities")
    enough = ImageArrays(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 3)
    images = RunImages(ImageTensorDataset(enough), ImageTensorDataset(enough), preprocessing)
    with pytest.raises(UserInputError, match="ONNX Runtime cannot quantize this model's operators"):
        quantize_checked(model, tmp_path / "out.onnx", images, task, QuantizeSettings(32))
    assert not (tmp_path / "out.onnx").exists()
