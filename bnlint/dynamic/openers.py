"""How each format's model is opened for running on --data (named by bnlint.formats records).

Each opener takes the static ModelInfo, the DynamicOptions and the resolved [tool.bnlint.dynamic]
settings and returns a Runner; it imports its engine itself, so a missing engine is one line
naming what to install.
"""

from __future__ import annotations

from bnlint.dynamic.options import DynamicOptions, parse_arch_kwargs
from bnlint.dynamic.runner import Runner
from bnlint.errors import UsageError
from bnlint.model import ModelInfo
from bnlint.settings import DynamicThresholds


def require_cuda_for_torch() -> None:
    """`--device cuda` means the same for every engine: an error when no GPU can be used."""
    try:
        import torch
    except ImportError:
        raise UsageError("--device cuda needs torch with CUDA") from None
    if not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch here (use --device cpu or auto)")


def open_torch_runner(model: ModelInfo, options: DynamicOptions, settings: DynamicThresholds) -> Runner:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("running a PyTorch model on --data needs torch (the [torch] extra: pip install '.[torch]' "
                         "from a clone)") from None
    from bnlint.dynamic.loading import open_torch
    from bnlint.dynamic.torch_runner import pick_device

    device = pick_device(settings.device)
    runner: Runner = open_torch(model, options.arch, parse_arch_kwargs(options.arch_kwargs), options.trust, device, options.data)
    return runner


def open_onnx_runner(model: ModelInfo, options: DynamicOptions, settings: DynamicThresholds) -> Runner:
    if options.arch:
        raise UsageError("--arch applies to PyTorch weights, not to an ONNX file")
    from bnlint.dynamic.onnx_runner import OnnxRunner

    runner = OnnxRunner(model, settings.onnx_engine, settings.device, options.data)
    if settings.device == "cuda" and "CUDA" not in runner.engine:
        raise UsageError(f"--device cuda: the ONNX engine here has no CUDA ({runner.engine}); "
                         "install onnxruntime-gpu, or use --device cpu / auto")
    return runner


def open_keras_runner(model: ModelInfo, options: DynamicOptions, settings: DynamicThresholds) -> Runner:
    from bnlint.dynamic.keras_runner import KerasRunner

    if settings.device == "cuda":
        require_cuda_for_torch()
    return KerasRunner(model, None, options.data, options.trust, options.arch)
