"""`bnlint fix`: repair BatchNorm statistics from data (exact, layer-by-layer recalibration).

Importing this package does not import torch; the torch engine and writer load it themselves.

    from bnlint.fix import recalibrate_file, write_torch_fix
    result = recalibrate_file("model.pt", "target.npz", arch="models.py:resnet50")
    write_torch_fix("model.pt", "fixed.pt", result.new_stats())

- `recalibrate_module(module, batches, *, layers, device, process_group, method, memory_budget, names)`
  recalibrates a live nn.Module or ScriptModule in place (bnlint.fix.torch_recalibrate);
- `recalibrate_file(path, data, *, arch, arch_kwargs, trust, inputs, batch_size, layers, device, process_group)`
  does it for a model file and a --data sample, naming layers as the static loader does;
- `write_torch_fix(input_path, output_path, new_stats, *, in_place=False)` copies a torch zip /
  legacy / TorchScript / safetensors file and patches only the bytes of the BN statistics
  (bnlint.fix.torch_write);
- `RecalibrationResult`, `LayerRecalibration`, `BNStatistics`, `RecalibrationError`: bnlint.fix.recalibrate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnlint.fix.recalibrate import BNStatistics, LayerRecalibration, RecalibrationError, RecalibrationResult

if TYPE_CHECKING:
    from bnlint.fix.torch_write import PatchReport

__all__ = ["BNStatistics", "LayerRecalibration", "RecalibrationError", "RecalibrationResult", "recalibrate_file", "recalibrate_module",
           "write_torch_fix"]


def recalibrate_module(module: Any, batches: Any, **options: Any) -> RecalibrationResult:
    """See bnlint.fix.torch_recalibrate.recalibrate_module (imports torch)."""
    from bnlint.fix.torch_recalibrate import recalibrate_module as run

    return run(module, batches, **options)


def recalibrate_file(path: str, data: str, **options: Any) -> RecalibrationResult:
    """See bnlint.fix.torch_recalibrate.recalibrate_file (imports torch)."""
    from bnlint.fix.torch_recalibrate import recalibrate_file as run

    return run(path, data, **options)


def write_torch_fix(input_path: str, output_path: str | None, new_stats: Any, *, in_place: bool = False) -> "PatchReport":
    """See bnlint.fix.torch_write.write_torch_fix (torch-free: byte patching only)."""
    from bnlint.fix.torch_write import write_torch_fix as write

    return write(input_path, output_path, new_stats, in_place=in_place)
