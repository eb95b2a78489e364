"""The second wall: every model execution runs in an isolated, time-bounded child (bnlint.sandbox).

Each test plants a behaviour in the model's forward through an --arch file (user code, so it
runs without --trust, exactly where a hostile model's code would run) and checks from outside,
through the real CLI, what the child could and could not do: read, write, connect, see secrets,
run forever, eat memory, crash, forge the protocol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bnlint.sandbox import codec
from bnlint.sandbox.landlock import abi_version

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
BNLINT = [sys.executable, "-m", "bnlint"]
STATE_DICT = FIXTURES / "convnet_state_dict.pt"
DATA = FIXTURES / "data" / "convnet_tiny.npz"

needs_landlock = pytest.mark.skipif(abi_version() < 1, reason="the kernel has no Landlock")


def _arch(tmp_path: Path, body: str) -> str:
    """An --arch file whose convnet runs `body` at the start of every forward."""
    payload = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    source = "\n".join([
        "import os, sys",
        f"sys.path.insert(0, {str(FIXTURES)!r})",
        "from models import convnet as _convnet",
        "def _payload():",
        payload,
        "def factory():",
        "    model = _convnet()",
        "    original = model.forward",
        "    def forward(x):",
        "        _payload()",
        "        return original(x)",
        "    model.forward = forward",
        "    return model",
        ""])
    folder = tmp_path / "arch"  # readable by the child: keep it apart from what the tests hide
    folder.mkdir(exist_ok=True)
    path = folder / "arch.py"
    path.write_text(source)
    return f"{path}:factory"


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BNLINT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


@needs_landlock
def test_the_model_cannot_read_write_or_connect_outside_its_walls(tmp_path: Path) -> None:
    secret = tmp_path / "secret" / "token.txt"
    secret.parent.mkdir()
    secret.write_text("hunter2")
    outside = tmp_path / "outside.txt"
    body = f"""
    import socket
    seen = []
    for what, attempt in (("read", lambda: open({str(secret)!r}).read()),
                          ("hostname", lambda: open("/etc/hostname").read()),
                          ("parent-environ", lambda: open("/proc/%d/environ" % os.getppid(), "rb").read()),
                          ("write", lambda: open({str(outside)!r}, "w").write("x")),
                          ("write-model-folder", lambda: open({str(FIXTURES / 'planted.txt')!r}, "w").write("x")),
                          ("tcp", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1)),
                          ("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
                          ("ipv6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM))):
        try:
            attempt()
            seen.append(what + "=ALLOWED")
        except OSError as exc:
            seen.append(what + "=denied(" + str(exc.errno) + ")")
    raise RuntimeError("walls: " + " ".join(seen))
    """
    result = _run([str(STATE_DICT), "--arch", _arch(tmp_path, body), "--data", str(DATA)])
    assert result.returncode == 2, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() + result.stderr.splitlines() if "walls:" in line)
    assert "ALLOWED" not in line, line
    for what in ("read", "hostname", "parent-environ", "write", "write-model-folder", "tcp", "udp", "ipv6"):
        assert f"{what}=denied" in line
    assert not outside.exists() and not (FIXTURES / "planted.txt").exists()
    assert "hunter2" not in result.stdout + result.stderr


def test_the_model_sees_no_secrets_from_the_environment(tmp_path: Path) -> None:
    body = """
    raise RuntimeError("env: token=" + str(os.environ.get("GITHUB_TOKEN")) + " aws=" + str(os.environ.get("AWS_SECRET_ACCESS_KEY"))
                       + " home=" + os.environ.get("HOME", ""))
    """
    result = _run([str(STATE_DICT), "--arch", _arch(tmp_path, body), "--data", str(DATA)],
                  env={"GITHUB_TOKEN": "ghp_canary", "AWS_SECRET_ACCESS_KEY": "aws_canary"})
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "token=None aws=None" in output
    assert "canary" not in output
    assert f"home={Path.home()}" not in output  # HOME is the child's private folder


def test_a_model_that_never_finishes_is_stopped_at_the_deadline_and_static_findings_survive(tmp_path: Path) -> None:
    body = """
    import time
    while True:
        time.sleep(0.05)
    """
    started = time.monotonic()
    fault = FIXTURES / "fault_nan_stats.pt"  # a state dict with a static error: its BN101 must still be reported
    result = _run([str(fault), str(STATE_DICT), "--arch", _arch(tmp_path, body), "--data", str(DATA), "--timeout", "5",
                   "--format", "json"], timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert elapsed < 50
    report = json.loads(result.stdout)
    files = {Path(f["path"]).name: f for f in report["files"]}
    assert set(files) == {"fault_nan_stats.pt", "convnet_state_dict.pt"}  # the second file was linted too
    for entry in files.values():
        assert entry["error"] is None  # the file was read: only its dynamic part did not finish
        assert "stopped after 5 s (--timeout)" in entry["dynamic_error"]
        assert "running the model on the data" in entry["dynamic_error"]
    assert "BN101" in {f["code"] for f in files["fault_nan_stats.pt"]["findings"]}


def test_a_crash_in_native_code_is_one_line_and_the_run_goes_on(tmp_path: Path) -> None:
    body = """
    import ctypes
    print('{"done": true}')  # a forged protocol line on stdout must not count
    sys.stdout.flush()
    ctypes.string_at(0)
    """
    result = _run([str(STATE_DICT), str(FIXTURES / "convnet_state_dict.pt"), "--arch", _arch(tmp_path, body), "--data", str(DATA)])
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "crashed" in line]
    assert errors and all("SIGSEGV" in line for line in errors), result.stdout + result.stderr


def test_a_model_that_eats_memory_is_stopped(tmp_path: Path) -> None:
    body = """
    hog = []
    while True:
        hog.append(bytearray(64 << 20))
    """
    result = _run([str(STATE_DICT), "--arch", _arch(tmp_path, body), "--data", str(DATA)],
                  env={"BNLINT_MEMORY_LIMIT_MB": "400"}, timeout=60)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "memory" in output.lower(), output


def test_an_onnx_loop_with_an_enormous_trip_count_is_stopped(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["x_in"], ["x_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None)])
    channels = 3
    stats = [helper.make_tensor(name, TensorProto.FLOAT, [channels], values) for name, values in
             (("g", [1.0] * channels), ("b", [0.0] * channels), ("m", [0.0] * channels), ("v", [1.0] * channels))]
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("t", TensorProto.INT64, [], [1 << 62])),
         helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
         helper.make_node("Loop", ["trips", "cond", "x"], ["looped"], body=body),
         helper.make_node("BatchNormalization", ["looped", "g", "b", "m", "v"], ["y"])],
        "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 4, 4])], initializer=stats)
    model = tmp_path / "loop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(8, channels, 4, 4)).astype(np.float32))
    started = time.monotonic()
    result = _run([str(model), "--data", str(data), "--timeout", "3"], timeout=60)
    assert time.monotonic() - started < 40
    assert result.returncode == 2
    assert "stopped after 3 s" in result.stdout + result.stderr


def test_the_parent_never_imports_torch_for_data_runs(tmp_path: Path) -> None:
    """The child measures, the parent judges: the CLI process itself stays free of torch."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""
        import sys
        sys.argv = ["bnlint", {str(FIXTURES / 'convnet_scripted.pt')!r}, "--data", {str(DATA)!r}, "--exit-zero", "-q"]
        from bnlint.cli import main
        try:
            main(standalone_mode=False)
        finally:
            print("TORCH", "torch" in sys.modules, file=sys.stderr)
    """))
    result = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "BNLINT_NORMAL_EXIT": "1"})
    assert "TORCH False" in result.stderr, result.stderr


def test_codec_round_trips_measurements_and_rejects_anything_else(tmp_path: Path) -> None:
    from bnlint.measurements import BatchDependence, ChannelMetrics, DriftSummary, DynamicThresholds, LayerDrift, Measurements

    kl = np.array([0.1, float("nan")])
    layer = LayerDrift("bn1", 0, 2, 1e-5, 10, 4, np.array([0.5, 1.0]), np.array([1.0, 2.0]), True,
                       per_channel=ChannelMetrics(kl, kl, kl, kl, kl, kl), summary=DriftSummary(8, mean_kl=0.1, noise_kl=None))
    measured = Measurements([layer], 10, DynamicThresholds(drift_kl=0.05), "torch", None, None, BatchDependence(4, 0.0, 0.0), [])
    codec.encode(measured, tmp_path)
    back = codec.decode(tmp_path)
    assert isinstance(back, Measurements) and isinstance(back.layers[0], LayerDrift)
    np.testing.assert_array_equal(back.layers[0].per_channel.kl, layer.per_channel.kl)
    assert back.dependence == measured.dependence

    for forged in ({"__kind__": "Popen", "args": ["sh"]},
                   {"__kind__": "LayerDrift", "name": 3},
                   {"__kind__": "Measurements", "layers": "x"},
                   {"__array__": "missing"}):
        (tmp_path / "result.json").write_text(json.dumps(forged))
        with pytest.raises(codec.ResultError):
            codec.decode(tmp_path)
    np.savez(tmp_path / "arrays.npz", a0=np.array(["text"]))
    (tmp_path / "result.json").write_text(json.dumps({"__array__": "a0"}))
    with pytest.raises(codec.ResultError):
        codec.decode(tmp_path)


def test_a_broken_import_while_unpickling_with_trust_names_the_import(tmp_path: Path) -> None:
    """With --trust, an import that fails while unpickling is the user's environment (a torchvision
    build that does not match torch): one line naming it, never 'internal error ... please report'."""
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("from torch import nn\nclass Net(nn.Sequential):\n    pass\n")
    model = tmp_path / "net.pt"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import userpkg\n"
            "torch.save(userpkg.Net(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval(), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(model)], check=True, timeout=120)
    (package / "__init__.py").write_text("raise ImportError('userpkg was built against another torch')\n")
    result = _run([str(model), "--trust", "--data", str(DATA)], env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "internal error" not in output and "Traceback" not in output
    assert "userpkg" in output and "built against another torch" in output


def test_the_default_deadline_grows_with_model_and_data(tmp_path: Path) -> None:
    from bnlint.sandbox import default_timeout

    small = default_timeout([str(STATE_DICT), str(DATA)])
    assert small >= 120  # generous: a deadline that fires on a healthy run is a false alarm
    model, data = tmp_path / "big.pt", tmp_path / "big.npz"
    with open(model, "wb") as handle:
        handle.truncate(100_000_000)  # sparse: sizes are what count
    with open(data, "wb") as handle:
        handle.truncate(150_000_000)
    assert default_timeout([str(model), str(data)]) == pytest.approx(120 + 100 * 150 / 50, rel=1e-3)
