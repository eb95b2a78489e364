"""The fast path of `bnlint fix` on TorchScript (issue 13), and that it changes no result.

The segments of the frozen graph run without TorchScript's profiling executor: each segment is a
new function run a few times, and profiling then specialising it cost more than its convolutions
on a CPU. These tests hold the results to the optimising executor's bit for bit and to the
independent reference of test_fix_torch, and guard the one trap of that mode: a callee first
compiled unoptimised keeps an un-inlined graph for the rest of the process, which would hide
every BatchNorm from later graph walks (the recalibration's and the linter's).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnlint.fix import RecalibrationError, torch_recalibrate  # noqa: E402
from bnlint.fix.torch_recalibrate import recalibrate_module  # noqa: E402
from tests.test_fix_torch import DATA, assert_matches, batches, data, residual, sequential_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def saved_script(tmp_path: Path, model: nn.Module) -> Path:
    """A TorchScript archive of `model`: each torch.jit.load of it has its own compilation unit,
    so no earlier test can have compiled (and so inlined) its functions already."""
    path = tmp_path / "scripted.pt"
    torch.jit.script(copy.deepcopy(model)).save(str(path))
    return path


def test_segments_run_without_the_profiling_executor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[bool] = []
    build = torch_recalibrate.ScriptSegments._function

    def spied(self: Any, start: int, end: int) -> Any:
        keys_in, keys_out, function = build(self, start, end)

        def call(*args: Any) -> Any:
            seen.append(torch._C._get_graph_executor_optimize())
            return function(*args)

        return keys_in, keys_out, call

    monkeypatch.setattr(torch_recalibrate.ScriptSegments, "_function", spied)
    result = recalibrate_module(torch.jit.load(str(saved_script(tmp_path, residual()))), batches(data(64), 32))
    assert result.method == "torchscript" and len(result.layers) == 7
    assert seen and not any(seen)  # the probe sample and both batches, every segment
    assert torch._C._get_graph_executor_optimize()  # restored afterwards


def test_results_equal_the_optimising_executor_bit_for_bit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model, x = residual(), data(96)
    path = saved_script(tmp_path, model)
    fast = recalibrate_module(torch.jit.load(str(path)), batches(x, 32))
    monkeypatch.setattr(torch_recalibrate, "_unoptimised", contextlib.nullcontext)  # the executor as before
    slow = recalibrate_module(torch.jit.load(str(path)), batches(x, 32))
    assert [layer.module for layer in fast.layers] == [layer.module for layer in slow.layers]
    for a, b in zip(fast.layers, slow.layers):
        np.testing.assert_array_equal(a.mean, b.mean, err_msg=a.name)
        np.testing.assert_array_equal(a.var, b.var, err_msg=a.name)
    assert_matches(fast, sequential_reference(model, x), 1e-6)


def test_a_fresh_archive_recalibrated_twice_and_then_linted_keeps_every_layer(tmp_path: Path) -> None:
    """The graph is inlined before anything runs unoptimised: were the model's one-sample check
    run first, its callees would be compiled un-inlined and no batch_norm would be found."""
    from bnlint.dynamic.torch_runner import ScriptRunner

    module, x = torch.jit.load(str(saved_script(tmp_path, residual()))), data(64)
    with torch.no_grad():  # as the fix runs it
        first = recalibrate_module(module, batches(x, 32))
        again = recalibrate_module(module, batches(x, 32))
    assert len(first.layers) == len(again.layers) == 7 and not first.skipped
    for a, b in zip(first.layers, again.layers):  # upstream already recalibrated: the same statistics again
        np.testing.assert_allclose(a.var, b.var, rtol=1e-6, err_msg=a.name)
    assert len(ScriptRunner(module, torch.device("cpu"), str(DATA)).layers) == 7


def test_a_batchnorm_called_twice_in_torchscript_is_refused(tmp_path: Path) -> None:
    bn = nn.BatchNorm2d(3)
    shared = nn.Sequential(bn, nn.ReLU(), bn).eval()
    with pytest.raises(RecalibrationError, match="more than once"):
        recalibrate_module(torch.jit.load(str(saved_script(tmp_path, shared))), batches(data(8), 4))


def test_cli_fix_of_a_torchscript_writes_the_exact_statistics(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bnlint.cli import main

    model, x = residual(), data()
    path, out = saved_script(tmp_path, model), tmp_path / "fixed.pt"
    result = CliRunner().invoke(main, ["fix", str(path), "--data", str(DATA), "-o", str(out), "--format", "json"],
                                catch_exceptions=False)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert json.loads(result.stdout)["fix"]["details"]["method"] == "torchscript"
    written = dict(torch.jit.load(str(out)).named_buffers())
    reference = sequential_reference(model, x)
    for name, (mean, var) in reference.items():
        assert np.max(np.abs(written[f"{name}.running_mean"].double().numpy() - mean) / np.sqrt(var)) < 1e-6, name
        np.testing.assert_allclose(written[f"{name}.running_var"].double().numpy(), var, rtol=1e-6, err_msg=name)


def test_recalibrate_file_reuses_the_callers_parse_of_the_same_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnlint.loaders
    from bnlint.fix.torch_recalibrate import recalibrate_file

    scripted, other = str(DATA.parents[1] / "convnet_scripted.pt"), str(DATA.parents[1] / "fault_traced_train.pt")
    info, parse = bnlint.loaders.load_model(scripted), bnlint.loaders.load_model
    calls: list[str] = []
    monkeypatch.setattr(bnlint.loaders, "load_model", lambda path, *a, **k: calls.append(str(path)) or parse(path, *a, **k))
    assert len(recalibrate_file(scripted, str(DATA), info=info).layers) == len(info.layers)
    assert calls == []
    with pytest.raises(RecalibrationError, match="traced in train mode"):  # another file's parse is never trusted for this one
        recalibrate_file(other, str(DATA), info=info)
    assert calls == [other]
