"""serve: a real server on a loopback port, from a checkpoint trained here, against predict and bad input."""

from __future__ import annotations

import argparse
import base64
import csv
import importlib.util
import io
import json
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import PHOTO_CLASSES as CLASSES
from tests.conftest import PHOTO_SIZES, QUIET, best_checkpoint, photo
from tests.servers import Server
from transfer_lightning.commands.main import main

pytest.importorskip("litserve", reason="the [serve] extra is not installed")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    generator = torch.Generator().manual_seed(3)
    for index in range(6):
        photo(index % 3, PHOTO_SIZES[index % len(PHOTO_SIZES)], generator).save(folder / f"p{index}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):  # noqa: F811
    temporary = tmp_path_factory.mktemp("server_tmp")
    args = ["--ckpt_path", str(trained / "last.ckpt"), "--max_batch_size", "8", "--max_megapixels", "0.01"]
    running = Server(*args, "--max_image_mb", "1", temporary=temporary)
    yield running
    assert running.stop() == 0  # SIGTERM stops it cleanly
    assert not list(temporary.iterdir())  # no temporary file left behind


def predicted(trained: Path, photos: Path, run_dir: Path) -> dict[str, dict[str, str]]:  # noqa: F811
    main(["predict", f"--ckpt_path={trained / 'last.ckpt'}", f"--data.predict_dir={photos}", *QUIET])
    (csv_file,) = run_dir.glob("lightning_logs/version_*/predictions.csv")
    return {row["path"]: row for row in csv.DictReader(csv_file.open())}


def test_answers_agree_with_predict_and_come_back_in_order(server, trained, photos, run_dir):  # noqa: F811
    rows = predicted(trained, photos, run_dir)
    names = sorted(rows)
    status, body = server.upload([(name, (photos / name).read_bytes()) for name in names])
    assert status == 200 and [p["file"] for p in body["predictions"]] == names  # several files, in order
    for prediction in body["predictions"]:
        row = rows[prediction["file"]]
        # Every class's probability as predict wrote it (the top-k covers all 3 classes here). The ranks of
        # classes within 1e-4 of each other may swap between the two float paths, so ranks are compared only
        # where the margin is larger.
        written = {row[f"top{rank}_class"]: float(row[f"top{rank}_probability"]) for rank in (1, 2, 3)}
        served = {entry["class"]: entry["probability"] for entry in prediction["top_k"]}
        assert served == pytest.approx(written, abs=1e-4)
        ranked = sorted(written.values(), reverse=True)
        if ranked[0] - ranked[1] > 1e-4:
            assert prediction["class"] == row["predicted_class"]
    encoded = base64.b64encode((photos / names[0]).read_bytes()).decode()
    status, body = server.post(json.dumps({"images": [encoded]}).encode(), "application/json")
    assert status == 200 and body["predictions"][0]["probability"] == pytest.approx(
        float(rows[names[0]]["probability"]), abs=1e-4
    )


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 40, 200)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        ("upload:notes.txt:hello", None, 400, "not an image file"),
        ("upload:cut.png:TRUNCATED", None, 400, "does not decode"),
        ("upload:zero.png:", None, 400, "is empty (0 bytes)"),
        ("upload:bomb.png:BIG", None, 413, "megapixels"),
        ("upload:huge.jpg:LARGE", None, 413, "MB per image"),
        ("field:wrong", None, 400, "multipart field 'file'"),
        ('{"images": ', "application/json", 400, "not valid JSON"),
        ('{"pictures": []}', "application/json", 400, "keys sent"),
        ('{"images": ["%%%"]}', "application/json", 400, "not base64"),
    ],
    ids=[
        "not-an-image",
        "truncated",
        "zero-bytes",
        "too-many-pixels",
        "too-large",
        "wrong-field",
        "bad-json",
        "wrong-key",
        "bad-base64",
    ],
)
def test_bad_input_gets_a_4xx_and_the_server_goes_on(server, photos, body, content_type, status, message):
    good = (photos / "p0.jpg").read_bytes()
    if body.startswith("upload:"):
        _, name, data = body.split(":", 2)
        data = {"TRUNCATED": good[: len(good) // 2], "BIG": png(200, 100), "LARGE": good + bytes(2**20)}.get(
            data, data.encode()
        )
        got, answer = server.upload([(name, data)])
    elif body.startswith("field:"):
        got, answer = server.upload([("p0.jpg", good)], field=body.split(":")[1])
    else:
        got, answer = server.post(body.encode(), content_type)
    assert got == status and message in answer["error"]
    assert server.upload([("p0.jpg", good)])[0] == 200  # still serving


def test_64_requests_from_16_threads_are_all_answered(server, photos):
    files = sorted(photos.iterdir())
    expected = {
        path.name: server.upload([(path.name, path.read_bytes())])[1]["predictions"][0]["class"] for path in files
    }

    def ask(index: int) -> bool:
        path = files[index % len(files)]
        status, body = server.upload([(path.name, path.read_bytes())])
        return status == 200 and body["predictions"][0]["class"] == expected[path.name]

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(ask, range(64)))


def test_health_info_and_page(server, trained):  # noqa: F811
    assert server.get("/health") == (200, b"ok")
    status, body = server.get("/info")
    info = json.loads(body)["model"]
    assert status == 200 and info["classes"] == list(CLASSES) and info["input"]["shape"] == ["N", 3, 32, 32]
    import hashlib

    assert info["sha256"] == hashlib.sha256((trained / "last.ckpt").read_bytes()).hexdigest()
    status, page = server.get("/")
    assert status == 200 and b"<title>transfer_lightning" in page
    assert b"http://" not in page and b"https://" not in page  # no CDN: works offline


FORMATS = ["pt2"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])


@pytest.mark.parametrize("format", FORMATS)
def test_an_exported_file_serves_the_same_answers(format, server, trained, photos, tmp_path):  # noqa: F811
    output = tmp_path / f"model.{format}"
    main(["export", f"--ckpt_path={trained / 'last.ckpt'}", f"--output={output}"])
    files = [(path.name, path.read_bytes()) for path in sorted(photos.iterdir())]
    if format == FORMATS[-1]:  # one format through a server process of its own, the other through serve's LitAPI here
        exported = Server("--model", str(output))
        try:
            got = exported.upload(files)[1]["predictions"]
        finally:
            assert exported.stop(signal.SIGINT) == 0  # Ctrl+C stops it cleanly too
    else:
        from transfer_lightning.serving.api import ClassifierAPI

        args = {"ckpt_path": None, "model": str(output), "max_image_mb": 1, "max_megapixels": 0.01, "top_k": 5}
        api = ClassifierAPI(argparse.Namespace(**args, max_batch_size=1))
        api.setup("cpu")
        request = {"images": [base64.b64encode(data).decode() for _, data in files]}
        got = api.encode_response(api.predict(api.decode_request(request)))["predictions"]
    want = server.upload(files)[1]["predictions"]
    for a, b in zip(got, want, strict=True):
        assert a["class"] == b["class"] and a["probability"] == pytest.approx(b["probability"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install -y chromium)")
@pytest.mark.parametrize("upload, shown", [("p0.jpg", "%"), ("notes.png", "Could not classify this file")])
def test_the_page_in_chromium_shows_bars_or_the_error(upload, shown, server, photos, tmp_path):
    image = tmp_path / upload
    image.write_bytes((photos / "p0.jpg").read_bytes() if upload.endswith(".jpg") else b"plain text")
    script = ROOT / "benchmarks" / "serve_page.py"
    command = [sys.executable, str(script), "--url", server.url + "/", "--image", str(image)]
    result = subprocess.run(
        [*command, "--output", str(tmp_path / "page.png")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert upload in result.stdout and shown in result.stdout
    assert (tmp_path / "page.png").stat().st_size > 5000


def test_too_many_images_in_one_request_is_a_413(server):
    status, answer = server.upload([(f"i{i}.png", png(4, 4)) for i in range(65)])
    assert status == 413 and "at most 64" in answer["error"]


def test_without_the_serve_extra_serve_names_it(trained, monkeypatch, capsys):  # noqa: F811
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "litserve" else real_find_spec(n))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", f"--ckpt_path={trained / 'last.ckpt'}"])
    assert exit_info.value.code == 2
    assert "install the serve extra (pip install -e '.[serve]')" in capsys.readouterr().err


def test_a_multilabel_model_answers_the_labels_above_their_thresholds(tagged, tmp_path):  # noqa: F811

    checkpoint = best_checkpoint(tagged)
    main(["export", f"--ckpt_path={checkpoint}", f"--output={tmp_path / 'model.pt2'}"])
    thresholds = json.loads((tmp_path / "model.pt2.json").read_text())["output"]["thresholds"]
    files = [(path.name, path.read_bytes()) for path in sorted((tagged / "images").iterdir())[:6]]
    running = Server("--ckpt_path", str(checkpoint), "--top_k", "4")
    try:
        status, body = running.upload(files)
    finally:
        assert running.stop() == 0
    assert status == 200
    for prediction in body["predictions"]:
        probabilities = {entry["class"]: entry["probability"] for entry in prediction["top_k"]}  # all 4 classes
        assert prediction["labels"] == [c for c in sorted(thresholds) if probabilities[c] >= thresholds[c]]
