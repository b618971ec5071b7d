"""``export --format onnx --quantize int8``: ONNX Runtime's static quantization, kept only when it scores within a set
drop of the float file on the run's validation split.

The float file is quantized as ONNX Runtime recommends for CPUs (QDQ format, per-channel int8 weights, uint8
activations; 7-bit weights on CPUs without VNNI, whose 8-bit products can saturate). Its activation ranges are
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
#: How many of the least accurate layers one recipe keeps in float.
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
    """One way of quantizing: the nodes kept in float, and how the activation ranges are calibrated."""

    name: str
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
    """Whether this CPU multiplies 8-bit integers without saturating (x86 VNNI); other CPUs get 7-bit weights."""
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
    reduce_range = not has_vnni()
    outcomes = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        prepared = work / "float.onnx"
        pre_process(float_file, prepared)
        for attempt, recipe in enumerate(recipes(prepared, work / "int8-0.onnx", calibration, reduce_range)):
            quantized = work / f"int8-{attempt}.onnx"
            quantize(prepared, quantized, calibration, recipe, reduce_range)
            got = probabilities(quantized, images, "int8")
            agreement = float((task.chosen(got) == task.chosen(expected)).all(dim=1).float().mean())
            outcomes.append(Outcome(recipe, float_score, task.score_of(got, labels), agreement))
            rank_zero_info(outcomes[-1].line(task.score))
            if outcomes[-1].drop <= settings.max_accuracy_drop:
                output.write_bytes(quantized.read_bytes())
                return describe(outcomes, calibration, reduce_range, len(labels), task.score, settings)
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


def recipes(model: Path, first_attempt: Path, calibration: Tensor, reduce_range: bool) -> Iterator[Recipe]:
    """The recipes in the order they are tried: plain, then the known fixes. The third ranks the layers by the
    ``first_attempt`` file (written by then), so it is worked out only when the first two fell short."""
    import onnx

    graph = onnx.load(str(model)).graph
    weighted = [node for node in graph.node if node.op_type in WEIGHTED_OPS]
    if not weighted:
        raise cannot_quantize(None)
    ends = (weighted[0].name, weighted[-1].name)  # the first convolution and the new head
    yield Recipe("every layer in int8")
    yield Recipe("the first convolution and the head in float", ends)
    sensitive = least_accurate_nodes(first_attempt, calibration[:SENSITIVITY_IMAGES], SENSITIVE_LAYERS, set(ends))
    yield Recipe(f"the first convolution, the head and {len(sensitive)} sensitive layers in float", ends + sensitive)
    yield Recipe("percentile calibration, the first convolution and the head in float", ends, "Percentile")


def quantize(model: Path, output: Path, calibration: Tensor, recipe: Recipe, reduce_range: bool) -> None:
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
                reduce_range=reduce_range,
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


def least_accurate_nodes(qdq_model: Path, images: Tensor, count: int, skip: set[str]) -> tuple[str, ...]:
    """The ``count`` nodes (outside ``skip``) whose inputs lose the most to quantization in ``qdq_model``: lowest
    signal-to-quantization-noise ratio, measured by ONNX Runtime's QDQ debugging tools on ``images``."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    augmented = qdq_model.with_name("activations.onnx")
    modify_model_output_intermediate_tensors(str(qdq_model), str(augmented))
    matches = create_activation_matching(collect_activations(str(augmented), ImageReader(images)))
    ratio = {
        name: compute_signal_to_quantization_noice_ratio(m["pre_qdq"], m["post_qdq"]) for name, m in matches.items()
    }
    ranked = sorted(ratio, key=ratio.get)
    consumers: dict[str, list[str]] = {}
    for node in onnx.load(str(qdq_model)).graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            for name in node.input:
                consumers.setdefault(name.removesuffix("_DequantizeLinear_Output"), []).append(node.name)
    chosen: list[str] = []
    for tensor in ranked:
        chosen += [name for name in consumers.get(tensor, []) if name not in skip and name not in chosen]
        if len(chosen) >= count:
            break
    return tuple(chosen[:count])


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
    outcomes: list[Outcome],
    calibration: Tensor,
    reduce_range: bool,
    checked: int,
    score: str,
    settings: QuantizeSettings,
) -> dict[str, Any]:
    """What the export's JSON says of the int8 file: how it was made, and how it compared with the float file."""
    kept = outcomes[-1]
    return {
        "method": "onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations",
        "weights_bits": 7 if reduce_range else 8,
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
