"""ONNX files of our models, and onnxruntime to run them: on CPUs it computes the same outputs as eager torch
several times faster (docs/performance.md, "Frozen features: onnxruntime against torch"). The ``[export]`` extra
provides the packages.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

#: Packages of the [export] extra that the ONNX format needs: onnxscript to export, onnxruntime to run.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def missing_onnx_packages() -> list[str]:
    """Names of :data:`ONNX_PACKAGES` that are not installed."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def dynamic_batch() -> tuple[dict[int, torch.export.Dim]]:
    """``dynamic_shapes`` for a module of one tensor argument that takes any batch size."""
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def write_onnx(module: nn.Module, example: Tensor, path: Path, input_name: str, output_name: str | list[str]) -> None:
    """Export ``module`` to the single ONNX file ``path``, its batch size dynamic (a list of output names for a
    module with several outputs)."""
    _export(
        module, example, path, input_name, output_name, dynamo=True, dynamic_shapes=dynamic_batch(),
        external_data=False,  # one self-contained file (ResNet18 and MobileNetV2 are far below protobuf's 2 GB)
    )  # fmt: skip


def write_onnx_for_this_process(
    module: nn.Module, example: Tensor, path: Path, input_name: str, output_name: str
) -> None:
    """Export ``module`` for onnxruntime in this process only (the feature cache), its batch size dynamic.

    torch's TorchScript exporter takes a fraction of the time of the torch.export one, whose time is a large part of
    a frozen fit on a few thousand small images (docs/performance.md, "The export and onnxruntime's threads"). It
    is deprecated, so
    its file never leaves the process and the caller checks its outputs against torch; a model it cannot export goes
    through :func:`write_onnx`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _export(module, example, path, input_name, output_name, dynamo=False, dynamic_axes={input_name: {0: "b"}})
    except Exception:  # noqa: BLE001 - whatever the old exporter trips on, the supported one decides
        write_onnx(module, example, path, input_name, output_name)


def _export(
    module: nn.Module, example: Tensor, path: Path, input_name: str, output_name: str | list[str], **exporter
) -> None:
    names = [output_name] if isinstance(output_name, str) else output_name
    torch.onnx.export(module, (example,), path, input_names=[input_name], output_names=names, verbose=False, **exporter)


def inference_session(path: Path | str):
    """An onnxruntime CPU session for the model file at ``path``, using torch's number of threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Its threads would spin after each run, taking the cores from torch's work between runs (resizing the next
    # batch; docs/performance.md measures it).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxFeatureExtractor:
    """The part of ``network`` before ``classifier_block``, exported once and run by onnxruntime on CPU.

    Maps normalised float images ``(N, 3, H, W)`` to the inputs of the classifier block, as
    :meth:`TransferClassifier.classifier_inputs` does in eval mode.
    """

    def __init__(self, network: nn.Module, classifier_block: str, example: Tensor) -> None:
        body = copy.deepcopy(network).cpu().float().eval()
        body.set_submodule(classifier_block, nn.Identity())  # the network then returns the block's inputs
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "features.onnx"
            write_onnx_for_this_process(body, example[:2].cpu().float().contiguous(), path, "images", "features")
            self.session = inference_session(path)  # reads the whole file; the folder can go

    def __call__(self, images: Tensor) -> Tensor:
        (features,) = self.session.run(None, {"images": images.cpu().float().contiguous().numpy()})
        return torch.from_numpy(features)
