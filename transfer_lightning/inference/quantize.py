"""``export --format onnx --quantize int8``: ONNX Runtime's static quantization, kept only when it scores within a set
drop of the float file on the run's validation split.

The float file is quantized as ONNX Runtime recommends for CPUs (QDQ format, per-channel int8 weights, uint8
activations; 8-bit weights only on CPUs with VNNI, where 8-bit products do not saturate). Its activation ranges are
calibrated on the run's own training images fed to the float file itself, so through its very preprocessing. When
the drop is too large, the known fixes are tried in turn (:func:`recipes`) and the first within the limit is written.
"""

from __future__ import annotations

import contextlib
import io
import platform
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from transfer_lightning.errors import UserInputError
from transfer_lightning.inference.run_images import RunImages
from transfer_lightning.logs import progress_bar
from transfer_lightning.network.onnx import inference_session
from transfer_lightning.tasks import Task

Quantization = Literal["int8"]
QUANTIZATIONS: tuple[Quantization, ...] = ("int8",)
#: Fewest training images that calibrate the activation ranges.
MIN_CALIBRATION_IMAGES = 32
#: Images per calibration batch.
BATCH_SIZE = 16
#: How many of the most damaging layers one recipe keeps in float.
SENSITIVE_LAYERS = 5
#: Images whose activations rank the layers (the sensitivity analysis keeps all of them in memory).
SENSITIVITY_IMAGES = 8
#: Percentile calibration keeps every activation of its images in memory (histograms of the whole set): at most these.
PERCENTILE_IMAGES = 64
#: The operators whose weights are quantized; a file with none of them quantized is not int8 at all.
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class QuantizeSettings:
    """``export``'s int8 options.

    Attributes:
        calibration_images: Training images that calibrate the activation ranges.
        max_accuracy_drop: Largest drop of the validation score (accuracy, or mAP), in points, that is written.
    """

    calibration_images: int = 256
    max_accuracy_drop: float = 1.0

    def __post_init__(self) -> None:
        if self.calibration_images < MIN_CALIBRATION_IMAGES:
            raise UserInputError(
                f"--calibration-images {self.calibration_images} is too few: calibrate on at least "
                f"{MIN_CALIBRATION_IMAGES} training images."
            )


@dataclass(frozen=True)
class Recipe:
    """One way of quantizing: the weights' bits, the nodes kept in float, and how activation ranges are calibrated."""

    name: str
    weight_bits: Literal[7, 8] = 7
    keep_float: tuple[str, ...] = ()
    calibration: Literal["MinMax", "Percentile"] = "MinMax"


@dataclass(frozen=True)
class Outcome:
    """How an int8 file did against the float file on the validation split (scores as fractions)."""

    recipe: Recipe
    float_score: float
    int8_score: float
    agreement: float

    @property
    def drop(self) -> float:
        """The score lost, in points."""
        return 100 * (self.float_score - self.int8_score)

    def line(self, score: str) -> str:
        return (
            f"int8 with {self.recipe.name}: {score} {100 * self.int8_score:.2f}% against float "
            f"{100 * self.float_score:.2f}% (drop {self.drop:.2f} points), same answer for {100 * self.agreement:.1f}%"
        )


def has_vnni() -> bool:
    """Whether this CPU multiplies 8-bit integers without saturating (x86 VNNI, Arm): only then are 8-bit weights
    tried; other CPUs get 7-bit weights."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return platform.machine().lower() in ("arm64", "aarch64")  # Arm's dot products do not saturate
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # not Linux: the safe choice
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_checked(
    float_file: Path, output: Path, images: RunImages, task: Task, settings: QuantizeSettings
) -> dict[str, Any]:
    """Write the int8 form of ``float_file`` to ``output`` once one recipe keeps the validation score within
    ``settings.max_accuracy_drop``; returns what the export's JSON says of it. ``output`` may be ``float_file``."""
    calibration = calibration_images(images, settings.calibration_images)
    if len(images.val) == 0:
        raise UserInputError("The run has no validation images to check the int8 model on: export it as float.")
    labels = images.val.labels
    expected = probabilities(float_file, images, "float")
    float_score = task.score_of(expected, labels)
    outcomes, files = [], []  # files: each tried recipe's int8 file, in order
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        prepared = work / "float.onnx"
        pre_process(float_file, prepared)
        for recipe in recipes(prepared, calibration[:SENSITIVITY_IMAGES], files):
            files.append(work / f"int8-{len(files)}.onnx")
            quantize(prepared, files[-1], calibration, recipe)
            got = probabilities(files[-1], images, "int8")
            agreement = float((task.chosen(got) == task.chosen(expected)).all(dim=1).float().mean())
            outcomes.append(Outcome(recipe, float_score, task.score_of(got, labels), agreement))
            rank_zero_info(outcomes[-1].line(task.score))
            if outcomes[-1].drop <= settings.max_accuracy_drop:
                output.write_bytes(files[-1].read_bytes())
                return describe(outcomes, calibration, len(labels), task.score, settings)
    best = min(outcomes, key=lambda outcome: outcome.drop)
    raise UserInputError(
        f"No int8 recipe stays within --max-accuracy-drop {settings.max_accuracy_drop:g} points of the float "
        f"{task.score} on the {len(labels)} validation images (best: {best.recipe.name}, {best.drop:.2f} points): "
        "nothing written. Allow a larger drop, or export as float."
    )


def pre_process(float_file: Path, prepared: Path) -> None:
    """ONNX Runtime's preparation for quantization (shape inference, graph optimisation) of ``float_file``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(float_file), str(prepared))
    except Exception as error:  # noqa: BLE001 - ONNX Runtime's graph tools fail on unsupported models many ways
        raise cannot_quantize(error) from None


def calibration_images(images: RunImages, count: int) -> Tensor:
    """``count`` training images, or a one-line error when the run has too few to calibrate on."""
    if len(images.train) < MIN_CALIBRATION_IMAGES:
        raise UserInputError(
            f"The run has {len(images.train)} training images; int8 calibration needs at least "
            f"{MIN_CALIBRATION_IMAGES}. Export it as float."
        )
    return images.sample_train(count)


def recipes(model: Path, probe_images: Tensor, files: list[Path]) -> Iterator[Recipe]:
    """The recipes in the order they are tried: plain, then the known fixes. One ranks the layers by the int8 file
    of the recipe before it (``files[-1]``, written by then), so it is worked out only when that one fell short."""
    import onnx

    graph = onnx.load(str(model)).graph
    weighted = [node for node in graph.node if node.op_type in WEIGHTED_OPS]
    if not weighted:
        raise cannot_quantize(None)
    ends = (weighted[0].name, weighted[-1].name)  # the first convolution and the new head
    if has_vnni():
        yield Recipe("every layer in int8", weight_bits=8)
    yield Recipe("7-bit weights")  # MobileNetV2 lost less with 7 than with 8, even with VNNI (docs/performance.md)
    yield Recipe("7-bit weights, the first convolution and the head in float", keep_float=ends)
    damaging = damaging_nodes(model, files[-1], probe_images, SENSITIVE_LAYERS, set(ends))
    yield Recipe(
        f"7-bit weights, the first convolution, the head and the {len(damaging)} most damaging layers in float",
        keep_float=ends + damaging,
    )
    yield Recipe(
        "percentile calibration, 7-bit weights, the first convolution and the head in float", 7, ends, "Percentile"
    )


def quantize(model: Path, output: Path, calibration: Tensor, recipe: Recipe) -> None:
    """``model`` quantized by ``recipe`` into ``output``: QDQ, per-channel int8 weights, uint8 activations."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if recipe.calibration == "Percentile":  # whole batches: its histogram calibrator stacks them into one array
        calibration = calibration[: min(PERCENTILE_IMAGES, len(calibration) // BATCH_SIZE * BATCH_SIZE)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibrators print their progress
            quantize_static(
                str(model),
                str(output),
                ImageReader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=recipe.weight_bits == 7,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(recipe.keep_float),
                calibrate_method=CalibrationMethod[recipe.calibration],  # MinMax keeps only each batch's ranges
            )
    except Exception as error:  # noqa: BLE001 - see quantize_checked
        raise cannot_quantize(error) from None
    if count_quantized_weights(onnx.load(str(output))) == 0:
        raise cannot_quantize(None)


def count_quantized_weights(model) -> int:
    """How many convolutions and matrix products of an ONNX model take their weights from a DequantizeLinear."""
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    return sum(
        1
        for node in model.graph.node
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in dequantized
    )


def damaging_nodes(float_model: Path, qdq_model: Path, images: Tensor, count: int, skip: set[str]) -> tuple[str, ...]:
    """The ``count`` nodes (outside ``skip``) that lose the most in ``qdq_model``: whose output's signal-to-noise
    ratio against the float model falls furthest below their inputs', on ``images`` (ONNX Runtime's QDQ debugging
    tools). Against the float model, not before and after each quantizer: a removed ReLU6 clips there on purpose."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    activations = []
    for model in (float_model, qdq_model):
        augmented = model.with_name(f"{model.stem}-activations.onnx")
        modify_model_output_intermediate_tensors(str(model), str(augmented))
        activations.append(collect_activations(str(augmented), ImageReader(images)))
    errors = compute_activation_error(create_activation_matching(activations[1], activations[0]))
    ratio = {tensor: error["xmodel_err"] for tensor, error in errors.items() if "xmodel_err" in error}
    losses = []
    for node in onnx.load(str(float_model)).graph.node:
        outputs, inputs = [ratio[t] for t in node.output if t in ratio], [ratio[t] for t in node.input if t in ratio]
        if outputs and inputs and node.name not in skip:
            losses.append((min(outputs) - min(inputs), node.name))
    return tuple(name for _, name in sorted(losses)[:count])


class ImageReader:
    """ONNX Runtime's calibration data reader over uint8 images, :data:`BATCH_SIZE` at a time (the protocol of its
    ``CalibrationDataReader``, whose module is imported only when quantizing)."""

    def __init__(self, images: Tensor) -> None:
        self.batches = iter(images.split(BATCH_SIZE))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch.contiguous().numpy()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.get_next, None)


def probabilities(model: Path, images: RunImages, what: str) -> Tensor:
    """The probabilities of the ONNX file ``model`` for every validation image."""
    session, batch_size = inference_session(model), 64
    batches = progress_bar(
        images.batches(images.val, batch_size), desc=f"Checking {what}", unit="batch", leave=False,
        total=-(-len(images.val) // batch_size),
    )  # fmt: skip
    return torch.cat([torch.from_numpy(session.run(None, {"images": batch.numpy()})[0]) for batch, _ in batches])


def cannot_quantize(error: Exception | None) -> UserInputError:
    why = f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})" if error else ""
    return UserInputError(f"ONNX Runtime cannot quantize this model's operators{why}: export it without --quantize.")


def describe(
    outcomes: list[Outcome], calibration: Tensor, checked: int, score: str, settings: QuantizeSettings
) -> dict[str, Any]:
    """What the export's JSON says of the int8 file: how it was made, and how it compared with the float file."""
    kept = outcomes[-1]
    return {
        "method": "onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations",
        "weights_bits": kept.recipe.weight_bits,
        "calibration": {"split": "train", "images": len(calibration), "method": kept.recipe.calibration},
        "recipe": kept.recipe.name,
        "kept_in_float": list(kept.recipe.keep_float),
        "checked": {
            "split": "val",
            "images": checked,
            "score": score,
            "float": kept.float_score,
            "int8": kept.int8_score,
            "same_answer": kept.agreement,
            "max_accuracy_drop_points": settings.max_accuracy_drop,
        },
        "tried": [asdict(outcome.recipe) | {"drop_points": outcome.drop} for outcome in outcomes],
    }
