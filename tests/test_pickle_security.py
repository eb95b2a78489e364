"""Hostile pickles and resource bombs through the real CLI and the loaders.

Every hostile file is built at test time from raw opcodes (tests/hostile.py) and only ever handed
to bnlint: its payload would `touch` a marker if anything ran it. Covered: BN001 from an allowlist
(the ten former bypasses, in zip and legacy files), every pickle of a file scanned, findings kept
when the load fails, memo/DAG expansion, bounded resources before allocation, and protocol 0/1
and tar files linted (not skipped) under --skip-unrecognised.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import io
import json
import pathlib
import pickle
import subprocess
import sys
import time
import types
import typing
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnlint.cli import main
from bnlint.errors import InputError, UnsafeInputError
from bnlint.loaders import detect, load_model
from bnlint.loaders import torch_zip as torch_zip_module
from bnlint.loaders.safe_pickle import SafeUnpickler, is_primitive, judge_call, looks_like_pickle, scan_pickle
from bnlint.loaders.torch_objects import plain, tensor_dict, walk_module
from bnlint.loaders.torchscript import parse_code
from tests import hostile as H

ROOT = Path(__file__).resolve().parent.parent

# Execution primitive(s) each payload must be reported with.
EXPECTED = {
    "fx_exec_with_source": "torch.fx.graph_module._exec_with_source",
    "jit_exec_wrapper": "torch.jit.unsupported_tensor_ops.execWrapper",
    "pydoc_pipepager": "pydoc.pipepager",
    "pydoc_locate_operator_call": "pydoc.locate",
    "doctest_debug_script": "doctest.debug_script",
    "imaplib_imap4_stream": "imaplib.IMAP4_stream",
    "osx_support_read_output": "_osx_support._read_output",
    "jit_script_stack_global": "torch.jit._script.CompilationUnit",
    "testing_exec_wrapper": "torch.testing._internal.jit_utils.execWrapper",
    "hub_load": "torch.hub.load",
    "getattr_chain": "builtins.getattr(...)(...)",
    "functools_partial": "functools.partial(...)(...)",
    "operator_attrgetter": "operator.attrgetter(...)(...)",
    "locate_then_reduce": "pydoc.locate(...)(...)",
    "build_partial": "functools.partial(...)(...)",
    "newobj_ex_popen": "subprocess.Popen",
    "build_on_global": "os.path [changed by BUILD]",
}


def run(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["--format", "json", "--fail-on", "warning", *args], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def findings(file: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [f for f in file["findings"] if f["code"] == code]


def reported_names(file: dict[str, Any]) -> set[str]:
    return {name for f in findings(file, "BN001") for name in f["values"]["globals"]}


@pytest.fixture
def marker(tmp_path: Path) -> Any:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload ran"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# 1. BN001 from an allowlist: the ten former bypasses, zip and legacy


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("payload", H.BYPASSES + ("newobj_ex_popen",))
def test_bypass_is_bn001_error_exit_1(tmp_path: Path, marker: Path, payload: str, layout: str) -> None:
    fragment = H.PAYLOADS[payload](marker)
    path = H.hostile_zip(tmp_path / "m.pt", fragment) if layout == "zip" else H.legacy_file(tmp_path / "m.pt", fragment)
    code, report = run(str(path))
    (file,) = report["files"]
    assert file["error"] is None and code == 1
    (hit,) = findings(file, "BN001")
    assert hit["severity"] == "error" and EXPECTED[payload] in hit["values"]["globals"]
    assert file["layers"] == 1  # the state_dict around the payload is still linted


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("payload", H.LOAD_FAILING + ("build_on_global",))
def test_failed_load_keeps_findings(tmp_path: Path, marker: Path, payload: str, layout: str) -> None:
    fragment = H.PAYLOADS[payload](marker)
    path = H.hostile_zip(tmp_path / "m.pt", fragment) if layout == "zip" else H.legacy_file(tmp_path / "m.pt", fragment)
    with pytest.raises(UnsafeInputError) as caught:
        load_model(path)
    assert EXPECTED[payload] in caught.value.unsafe_globals and str(path) in str(caught.value)
    code, report = run(str(path))
    (file,) = report["files"]
    assert code == 2 and file["error"]
    (hit,) = findings(file, "BN001")
    assert EXPECTED[payload] in hit["values"]["globals"]


def test_scan_failure_mid_stream_keeps_what_was_seen(tmp_path: Path, marker: Path) -> None:
    """Truncated right after the payload: the scan fails, what it saw is still reported."""
    data = H.proto(2) + H.PAYLOADS["pydoc_pipepager"](marker) + b"X\xff\xff\xff\x7f"
    path = H.torch_zip(tmp_path / "m.pt", data)
    with pytest.raises(UnsafeInputError) as caught:
        load_model(path)
    assert caught.value.unsafe_globals == ["pydoc.pipepager"]


def test_unknown_callable_is_bn003_warning(tmp_path: Path, marker: Path) -> None:
    path = H.hostile_zip(tmp_path / "m.pt", H.PAYLOADS["unknown_module_function"](marker))
    code, report = run(str(path))
    (file,) = report["files"]
    assert code == 1 and not findings(file, "BN001")
    (hit,) = findings(file, "BN003")
    assert hit["severity"] == "warning" and hit["values"]["callables"] == ["somepkg.tools.run_script"]
    result = CliRunner().invoke(main, ["--fail-on", "error", str(path)], catch_exceptions=False)
    assert result.exit_code == 0


def test_referenced_globals_are_not_findings_unless_primitives(tmp_path: Path) -> None:
    unknown_ref = H.state_dict_pickle([(H.text("hparams_type"), H.glob("somepkg.config", "Config")),
                                       (H.text("any"), H.glob("typing", "Any"))])
    code, report = run(str(H.torch_zip(tmp_path / "a.pt", unknown_ref)))
    assert not findings(report["files"][0], "BN001") and not findings(report["files"][0], "BN003")
    primitive_ref = H.state_dict_pickle([(H.text("hook"), H.glob("os", "system"))])
    code, report = run(str(H.torch_zip(tmp_path / "b.pt", primitive_ref)))
    assert code == 1 and reported_names(report["files"][0]) == {"os.system"}


def test_nothing_is_executed_or_imported(tmp_path: Path) -> None:
    """Lint every hostile file in a fresh interpreter: no marker, no payload module imported."""
    marker = tmp_path / "PWNED"
    paths = []
    for name, make in H.PAYLOADS.items():
        paths.append(H.hostile_zip(tmp_path / f"{name}.pt", make(marker)))
        paths.append(H.legacy_file(tmp_path / f"{name}.legacy.pt", make(marker)))
    script = (
        "import json, sys\n"
        "from bnlint.api import lint_paths\n"
        f"watch = {list(H.IMPORTED_MODULES)!r}\n"
        "before = {m for m in watch if m in sys.modules}\n"
        f"report = lint_paths({[str(p) for p in paths]!r})\n"
        "print(json.dumps({'new': sorted(m for m in watch if m in sys.modules and m not in before),"
        " 'files': len(report.files)}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"new": [], "files": len(paths)}
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 2. Every pickle of a file is scanned


@pytest.mark.parametrize("where", ["constants.pkl", "extra/x.pkl", "data.pkl"])
def test_every_zip_pickle_is_scanned(tmp_path: Path, marker: Path, where: str) -> None:
    path = H.hostile_zip(tmp_path / "m.pt", H.PAYLOADS["doctest_debug_script"](marker), where)
    code, report = run(str(path))
    assert code == 1 and "doctest.debug_script" in reported_names(report["files"][0])


@pytest.mark.parametrize("slot", range(5))
def test_every_legacy_pickle_is_scanned(tmp_path: Path, marker: Path, slot: int) -> None:
    path = H.legacy_file(tmp_path / "m.pt", H.PAYLOADS["imaplib_imap4_stream"](marker), slot)
    code, report = run(str(path))
    (file,) = report["files"]
    assert code == 1 and file["error"] is None and "imaplib.IMAP4_stream" in reported_names(file)


def test_torchscript_constants_pickle_is_scanned(tmp_path: Path, marker: Path) -> None:
    constants = H.whole(H.tup(H.PAYLOADS["fx_exec_with_source"](marker)))
    path = H.torchscript_zip(tmp_path / "ts.pt", "class M(Module):\n  __parameters__ = []\n", constants)
    code, report = run(str(path))
    assert code == 1 and "torch.fx.graph_module._exec_with_source" in reported_names(report["files"][0])


def test_duplicate_pickle_members_are_refused(tmp_path: Path, marker: Path) -> None:
    path = H.torch_zip(tmp_path / "m.pt", H.state_dict_pickle())
    with zipfile.ZipFile(path, "a") as archive, pytest.warns(UserWarning):
        archive.writestr("archive/data.pkl", H.state_dict_pickle([(H.text("x"), H.PAYLOADS["pydoc_pipepager"](marker))]))
    with pytest.raises(UnsafeInputError, match="duplicate") as caught:
        load_model(path)
    assert caught.value.unsafe_globals == ["pydoc.pipepager"]  # every copy was scanned first


# ---------------------------------------------------------------------------------------------
# Benign checkpoints stay clean: Lightning + omegaconf hyper-parameters, common config values


def _omegaconf_standins(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Classes pickled under omegaconf's module names, shaped like omegaconf 2.3's own state."""
    modules = {name: types.ModuleType(name) for name in
               ("omegaconf", "omegaconf.base", "omegaconf.nodes", "omegaconf.dictconfig", "omegaconf.listconfig")}

    def cls(module: str, name: str, base: type = object, dataclass: bool = False) -> type:
        made = type(name, (base,), {"__module__": module, "__qualname__": name})
        if dataclass:
            made = dataclasses.dataclass(made)
        setattr(modules[module], name, made)
        return made

    @dataclasses.dataclass
    class _Meta:
        ref_type: Any
        object_type: Any
        optional: bool
        key: Any
        flags: Any = None
        flags_root: bool = False
        resolver_cache: Any = dataclasses.field(default_factory=lambda: collections.defaultdict(dict))

    @dataclasses.dataclass
    class _ContainerMeta(_Meta):
        key_type: Any = typing.Any
        element_type: Any = typing.Any

    ns = types.SimpleNamespace(
        Metadata=cls("omegaconf.base", "Metadata", _Meta),
        ContainerMetadata=cls("omegaconf.base", "ContainerMetadata", _ContainerMeta),
        AnyNode=cls("omegaconf.nodes", "AnyNode"),
        DictConfig=cls("omegaconf.dictconfig", "DictConfig"),
        ListConfig=cls("omegaconf.listconfig", "ListConfig"),
    )
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return ns


def _node(ns: types.SimpleNamespace, key: str, value: Any, parent: Any) -> Any:
    node = ns.AnyNode()
    node.__dict__.update(_val=value, _metadata=ns.Metadata(ref_type=typing.Any, object_type=None, optional=True, key=key),
                         _parent=parent, _flags_cache=None)
    return node


def _config(ns: types.SimpleNamespace, values: dict[str, Any]) -> Any:
    config = ns.DictConfig()
    content: dict[str, Any] = {}
    config.__dict__.update(_metadata=ns.ContainerMetadata(ref_type=typing.Any, object_type=dict, optional=True, key=None,
                                                          flags={"struct": False}),
                           _parent=None, _flags_cache=None, _content=content)
    for key, value in values.items():
        if isinstance(value, list):
            child = ns.ListConfig()
            child.__dict__.update(_metadata=ns.ContainerMetadata(ref_type=typing.Any, object_type=list, optional=True, key=key),
                                  _parent=config, _flags_cache=None, _content=[_node(ns, str(i), v, None) for i, v in enumerate(value)])
            content[key] = child
        else:
            content[key] = _node(ns, key, value, config)
    return config


def test_lightning_checkpoint_with_omegaconf_hparams_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    ns = _omegaconf_standins(monkeypatch)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    for _ in range(3):
        net(torch.randn(8, 3, 8, 8))
    hparams = _config(ns, {"lr": 0.01, "layers": [1, 2, 3], "name": "net"})
    checkpoint = {
        "epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.2.0", "state_dict": net.state_dict(),
        "hyper_parameters": hparams, "hparams_type": ns.DictConfig, "hparams_name": "kwargs",
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "", "dirpath": pathlib.PosixPath("/tmp/ckpt")}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999)}]}], "lr_schedulers": [],
        "extra": {"args": argparse.Namespace(seed=1), "when": datetime.datetime(2026, 1, 2), "type": typing.Optional[int],
                  "counts": collections.Counter("aab"), "queue": collections.deque([1]), "array": np.arange(4.0),
                  "dtype": np.dtype("float32"), "scalar": np.float32(1.5), "none": type(None), "bytes": b"", "set": {1, 2},
                  "defaults": collections.defaultdict(list)},
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch refuses the omegaconf classes: it is no looser than us
    code, report = run(str(path))
    (file,) = report["files"]
    assert file["error"] is None and file["format"] == "lightning"
    assert not findings(file, "BN001") and not findings(file, "BN003"), file["findings"]
    info = load_model(path)
    assert info.unsafe_globals == [] and info.hyper_parameters == {"lr": 0.01, "layers": [1, 2, 3], "name": "net"}
    # Legacy layout and protocol 4 too.
    legacy = tmp_path / "legacy.ckpt"
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False, pickle_protocol=4)
    code, report = run(str(legacy))
    assert report["files"][0]["error"] is None and not findings(report["files"][0], "BN001") and not findings(report["files"][0], "BN003")


def test_pickled_torch_module_is_clean_and_user_class_is_bn003(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval(), path)
    code, report = run(str(path))
    assert not findings(report["files"][0], "BN001") and not findings(report["files"][0], "BN003")
    code, report = run(str(ROOT / "fixtures" / "convnet_custom_module.pt"))
    (hit,) = findings(report["files"][0], "BN003")
    assert hit["values"]["callables"] == ["fixtures.models.TinyConvNet"]


# ---------------------------------------------------------------------------------------------
# 4/5. Resource bombs fail fast with bounded memory (measured in a fresh interpreter)


def _bombs(tmp_path: Path) -> dict[str, Path]:
    one = {"0": b"\0" * 4, "1": b"\0" * 4}
    stride0 = H.whole(H.dict_of([(H.text(f"bn.{n}"), H.tensor(k, (10**9,), (0,), numel=1))
                                 for n, k in (("running_mean", "0"), ("running_var", "1"))]))
    huge = H.whole(H.dict_of([(H.text(f"bn.{n}"), H.tensor(k, (2**80,), (0,), numel=1))
                              for n, k in (("running_mean", "0"), ("running_var", "1"))]))
    big_storage = H.whole(H.dict_of([(H.text(f"bn.{n}"), H.tensor("1", (400 << 20,), (1,)))
                                     for n in ("running_mean", "running_var")]))
    members = {"data.pkl": H.state_dict_pickle(), "byteorder": b"little", **{f"data/{k}": v for k, v in H.bn_storages().items()}}
    shared_modules = H.whole(H.glob("torch.nn.modules.container", "Sequential") + b")\x81" + H.dict_of([
        (H.text("training"), H.FALSE), (H.text("_parameters"), H.EMPTY_DICT), (H.text("_buffers"), H.EMPTY_DICT),
        (H.text("_modules"), H.dict_of([(H.text(f"m{i}"), H.glob("torch.nn.modules.linear", "Identity") + b")\x81" + H.dict_of([
            (H.text("_parameters"), H.EMPTY_DICT), (H.text("_buffers"), H.EMPTY_DICT), (H.text("_modules"), H.EMPTY_DICT)]) + b"b")
            for i in range(2)]))]) + b"b")
    return {
        "memo_index_2**31": H.torch_zip(tmp_path / "memo.pt", H.memo_bomb()),
        "binunicode_past_eof": H.torch_zip(tmp_path / "unicode.pt", H.unicode_past_eof()),
        "proto5_huge_frame": H.torch_zip(tmp_path / "frame.pt", H.huge_frame()),
        "legacy_memo_index": write(tmp_path / "memo_legacy.pt", H.memo_bomb()),
        "dag_hyper_parameters": H.torch_zip(tmp_path / "dag.pt", H.lightning_dag(200)),
        "shared_state_copies": H.torch_zip(tmp_path / "state.pt", H.shared_state_bomb()),
        "shared_mapping_keys": H.torch_zip(tmp_path / "mapping.pt", H.shared_mapping_checkpoint()),
        "module_tree": H.torch_zip(tmp_path / "modules.pt", shared_modules),
        "stride0_1e9": H.torch_zip(tmp_path / "stride0.pt", stride0, one),
        "size_2**80": H.torch_zip(tmp_path / "huge.pt", huge, one),
        "zip_bomb_data_pkl": H.zip_with_bomb(tmp_path / "zpkl.pt", "data.pkl", 1600 << 20, members),
        "zip_bomb_data_pkl_small": H.zip_with_bomb(tmp_path / "zpkl2.pt", "data.pkl", 200 << 20, members),
        "zip_bomb_byteorder": H.zip_with_bomb(tmp_path / "zorder.pt", "byteorder", 1600 << 20, members),
        "zip_bomb_code": H.zip_with_bomb(tmp_path / "zcode.pt", "code/__torch__.py", 1600 << 20,
                                         {**members, "constants.pkl": H.whole(b")")}),
        "zip_bomb_storage": H.zip_with_bomb(tmp_path / "zstorage.pt", "data/1", 1600 << 20, {**members, "data.pkl": big_storage}),
        "code_regex": H.torchscript_zip(tmp_path / "code.pt", H.regex_bomb_code()),
    }


def test_resource_bombs_fail_fast_with_bounded_memory(tmp_path: Path) -> None:
    bombs = _bombs(tmp_path)
    script = (
        "import json, resource, sys, time\n"
        "from bnlint.api import lint_paths\n"
        # VmHWM belongs to this process image; ru_maxrss survives exec and would count the pytest worker that forked us
        "def peak_mb():\n"
        "    try:\n"
        "        for line in open('/proc/self/status'):\n"
        "            if line.startswith('VmHWM:'):\n"
        "                return int(line.split()[1]) / 1024\n"
        "    except OSError:\n"
        "        pass\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "out = {}\n"
        f"for name, path in {[(k, str(v)) for k, v in bombs.items()]!r}:\n"
        "    start = time.perf_counter()\n"
        "    report = lint_paths([path])\n"
        "    file = report.files[0]\n"
        "    out[name] = {'seconds': time.perf_counter() - start, 'error': file.error.message if file.error else None,\n"
        "                 'codes': sorted({f.code for f in file.findings}),\n"
        "                 'maxrss_mb': peak_mb()}\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(outcome, indent=1))  # timings and memory, shown with -s
    for name, row in outcome.items():
        assert row["seconds"] < 2.0, (name, row)
        assert row["maxrss_mb"] < 600, (name, row)
    refused = ("memo_index_2**31", "binunicode_past_eof", "proto5_huge_frame", "legacy_memo_index", "shared_state_copies",
               "stride0_1e9", "size_2**80", "zip_bomb_data_pkl", "zip_bomb_data_pkl_small", "zip_bomb_byteorder", "zip_bomb_code",
               "zip_bomb_storage")
    for name in refused:
        assert outcome[name]["error"], (name, outcome[name])
    assert "memo index" in outcome["memo_index_2**31"]["error"]
    assert "stride-0" in outcome["stride0_1e9"]["error"]
    assert "zip bomb" in outcome["zip_bomb_data_pkl_small"]["error"]
    assert "inflate" in outcome["zip_bomb_storage"]["error"]
    for name in ("dag_hyper_parameters", "shared_mapping_keys", "module_tree", "code_regex"):
        assert outcome[name]["error"] is None, (name, outcome[name])


def test_member_count_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_zip_module, "MAX_MEMBERS", 5)
    path = H.torch_zip(tmp_path / "m.pt", H.state_dict_pickle())
    with pytest.raises(InputError, match="members"):
        load_model(path)


def test_plain_walks_a_dag_in_bounded_work() -> None:
    shared: list[Any] = []
    for _ in range(100):
        shared = [shared, shared]
    start = time.perf_counter()
    assert plain({"x": shared})["x"][0][0][0]  # truncated, not exponential
    wide = [list(range(10_000))] * 10_000
    assert plain(wide)
    assert time.perf_counter() - start < 1.0


def test_walkers_read_shared_containers_once() -> None:
    from bnlint.loaders.safe_pickle import stub_class

    shared_params = collections.OrderedDict((f"p{i}", None) for i in range(50_000))
    children = collections.OrderedDict()
    modules = []
    for i in range(5_000):
        child = stub_class("torch.nn.modules.linear.Linear")()
        child.state.update(_parameters=shared_params, _buffers={}, _modules={})
        children[f"c{i}"] = child
        modules.append(child)
    root = stub_class("torch.nn.modules.container.Sequential")()
    root.state.update(_parameters={}, _buffers={}, _modules=children)
    start = time.perf_counter()
    found, _ = walk_module(root)
    assert len(found) == 5_001 and sum(len(m.params) for m in found.values()) == 50_000
    cache: dict[int, Any] = {}
    for _ in range(10_000):
        tensor_dict(shared_params, cache)
    assert time.perf_counter() - start < 2.0


def test_torchscript_code_parsing_is_linear() -> None:
    code = H.regex_bomb_code(400_000)
    start = time.perf_counter()
    classes = parse_code({"code/__torch__.py": code})
    assert time.perf_counter() - start < 2.0
    assert "__torch__.M" in classes
    traced = ("class M(Module):\n  __parameters__ = [\"weight\", ]\n  def forward(self, x):\n"
              "    _0 = torch.batch_norm(x, w, b, m, v, True, 0.10000000000000001, 1.0000000000000001e-05, True)\n"
              "    return torch.batch_norm(annotate(Tensor, x), w, b, m, v, False, 0.1, 1e-05, True)\n")
    calls = parse_code({"code/__torch__.py": traced})["__torch__.M"].bn_calls
    assert [(c["training"], c["momentum"], c["eps"], c["line"], c["method"]) for c in calls] == [
        (True, 0.1, 1e-05, 4, "forward"), (False, 0.1, 1e-05, 5, "forward")]


# ---------------------------------------------------------------------------------------------
# 6. Protocol 0/1 pickles and tar checkpoints are model files, also with --skip-unrecognised


@pytest.mark.parametrize("protocol", [0, 1])
def test_old_protocol_pickles_are_linted_not_skipped(tmp_path: Path, marker: Path, protocol: int) -> None:
    payload = H.PAYLOADS["pydoc_pipepager"](marker) + H.STOP
    evil = write(tmp_path / f"evil{protocol}.bin", payload if protocol == 0 else H.list_of(payload[:-1]) + H.STOP)
    benign = write(tmp_path / f"plain{protocol}.pkl", H.pickle_of({"a": [1, 2.5, "x"], "b": None}, protocol))
    code, report = run("--skip-unrecognised", str(evil), str(benign))
    by_path = {Path(f["path"]).name: f for f in report["files"]}
    assert set(by_path) == {evil.name, benign.name} and code == 2
    assert "pydoc.pipepager" in reported_names(by_path[evil.name])
    assert "plain Python pickle" in by_path[benign.name]["error"]


def test_tar_checkpoints_are_linted_not_skipped(tmp_path: Path, marker: Path) -> None:
    clean = H.tar_checkpoint(tmp_path / "clean.pt")
    code, report = run("--skip-unrecognised", str(clean))
    (file,) = report["files"]
    assert file["error"] is None and any("legacy tar checkpoint: BN statistics not read" in n for n in file["notes"])
    for member in ("sys_info", "pickle", "storages", "tensors"):
        evil = H.tar_checkpoint(tmp_path / f"evil_{member}.pt", H.PAYLOADS["osx_support_read_output"](marker), member)
        code, report = run("--skip-unrecognised", str(evil))
        assert code == 1 and "_osx_support._read_output" in reported_names(report["files"][0]), member


def test_text_files_are_still_not_models(tmp_path: Path) -> None:
    texts = {"README.md": "# title\n", "train.py": "print(1)\n", "conf.json": '{"a": 1}', "data.csv": "N,1\n2,3\n",
             "notes.txt": "In 1999 (and later) the cat sat.\n", "list.txt": "(lp0\nhello\n", "tar.txt": "c os\nsystem\n"}
    paths = [write(tmp_path / name, content.encode()) for name, content in texts.items()]
    result = CliRunner().invoke(main, ["--skip-unrecognised", "--format", "json", *map(str, paths)], catch_exceptions=False)
    assert json.loads(result.stdout)["files"] == [] and result.exit_code == 0


def test_detect_recognises_pickles_of_every_protocol(tmp_path: Path) -> None:
    for protocol in range(6):
        path = write(tmp_path / f"p{protocol}", H.pickle_of({"k": list(range(5000)), "s": "x" * 100}, protocol))
        assert detect(path).kind == "torch-pickle", protocol
    assert looks_like_pickle(b"(dp0\nS'a'\np1\nI1\ns.")
    assert not looks_like_pickle(b"(this is text)\n") and not looks_like_pickle(b"I am not a pickle\n.")


# ---------------------------------------------------------------------------------------------
# The scanner and the policy, unit by unit

BENIGN_VALUES: list[Any] = [
    None, True, 1, -5, 2**100, 1.5, "s", b"b", bytearray(b"x"), (1, 2), [1, [2]], {"a": {1, 2}}, frozenset({1}),
    collections.OrderedDict(a=1), collections.defaultdict(list, {1: [2]}), complex(1, 2), slice(1, 2), range(3), type(None),
    datetime.timedelta(3), argparse.Namespace(a=1), pathlib.PurePosixPath("/a/b"), np.arange(6).reshape(2, 3),
    np.float32(3), np.dtype("f4"), typing.List[int], typing.Optional[int], typing.Any, b"",
]


@pytest.mark.parametrize("protocol", range(6))
def test_benign_values_scan_clean_in_every_protocol(protocol: int) -> None:
    for value in BENIGN_VALUES:
        data = pickle.dumps(value, protocol=protocol)
        scan = scan_pickle(data)
        assert (scan.error, scan.unsafe, scan.unknown, scan.end) == (None, [], [], len(data)), repr(value)


def test_policy() -> None:
    assert judge_call("torch._utils._rebuild_tensor_v2") == "allowed"
    assert judge_call("torch.nn.modules.batchnorm.BatchNorm2d") == "allowed"
    assert judge_call("__torch__.torch.nn.modules.conv.___torch_mangle_3.Conv2d") == "allowed"
    assert judge_call("omegaconf.nodes.AnyNode") == "allowed"
    assert judge_call("builtins.type", [None]) == "allowed" and judge_call("builtins.type", [None, None, None]) == "unknown"
    assert judge_call("operator.getitem", ["typing.List", None]) == "allowed"
    assert judge_call("operator.getitem", ["os.environ", None]) == "unknown"
    assert judge_call("mypkg.models.Net") == "unknown"
    assert judge_call("torch.nn.modules.module.register_module_forward_hook") == "unknown"
    for name in ("builtins.getattr", "builtins.print", "os.system", "torch.serialization.os.system", "torch.load",
                 "pathlib.Path.write_text", "numpy.load", "pip.__main__.main", "builtins.object.__subclasses__",
                 "__torch__.os.system", "functools.reduce", "operator.methodcaller", "torch.storage._load_from_bytes"):
        assert judge_call(name) == "primitive", name
    assert not is_primitive("copyreg._reconstructor") and is_primitive("copyreg.add_extension")


def test_reconstructor_arguments_are_judged() -> None:
    data = H.whole(H.call(H.glob("copyreg", "_reconstructor"), H.glob("mypkg", "Config"), H.glob("builtins", "object"), H.NONE))
    assert scan_pickle(data).unknown == ["mypkg.Config"]
    evil = H.whole(H.call(H.glob("copyreg", "_reconstructor"), H.glob("subprocess", "Popen"), H.glob("builtins", "object"), H.NONE))
    assert "subprocess.Popen" in scan_pickle(evil).unsafe


def test_objects_handed_to_data_constructors_are_judged() -> None:
    data = H.whole(H.call(H.glob("builtins", "list"), H.glob("somepkg.registry", "ITEMS")))
    assert scan_pickle(data).unknown == ["somepkg.registry.ITEMS [read by builtins.list]"]
    assert scan_pickle(H.whole(H.call(H.glob("builtins", "set"), H.list_of(H.integer(1))))).unknown == []


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_scanner_never_raises_on_garbage(data: bytes) -> None:
    scan = scan_pickle(data)
    assert scan.error is not None or scan.end <= len(data)


TOKENS = [
    b"(", b"t", b")", b"]", b"}", b"e", b"u", b"s", b"a", b"R", b"\x81", b"b", b"0", b"1", b"2", b"N", b"K\x01", b"q\x00",
    b"h\x00", b"q\x01", b"h\x01", b"\x94", b"\x85", b"\x86", b"\x87", b"\x8f", b"\x90", b"\x91", b"l", b"d", b"o", b"\x92",
    b"\x93", b"Q", b"Pid\n", b"imypkg\nOther\n", b"p0\n", b"g0\n", b"S'x'\n", b"I01\n", b"L5L\n", b"F1.5\n", b"Vabc\n",
    b"\x82\x01", b"\x98", b"r\x02\x00\x00\x00", b"j\x02\x00\x00\x00", b"\x95\x01" + bytes(7),
    H.text("os"), H.text("system"), H.glob("os", "system"), H.glob("collections", "OrderedDict"), H.glob("mypkg", "Thing"),
    H.glob("copyreg", "_reconstructor"),
]


@given(st.lists(st.sampled_from(TOKENS), max_size=40))
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_scanner_agrees_with_the_c_unpickler(tokens: list[bytes]) -> None:
    """Whatever the C unpickler (with our never-importing find_class) accepts, the scan accepts too,
    and it saw every global the unpickler resolved."""
    data = b"".join(tokens) + H.STOP  # protocol 0 (Python 2 names mapped) unless a token says otherwise
    unpickler = SafeUnpickler(io.BytesIO(data), persistent=lambda pid: pid)
    try:
        unpickler.load()
    except Exception:  # noqa: BLE001 - the oracle may refuse; then there is nothing to compare
        return
    scan = scan_pickle(data)
    assert scan.error is None, scan.error
    assert unpickler.globals_seen <= scan.globals_seen or "<STACK_GLOBAL with a computed name>" in scan.unsafe


def test_persistent_ids_that_return_classes_are_judged() -> None:
    """Legacy torch returns ("module", cls, ...)[1] and the tar format tuple[0] from persistent_load."""
    module_pid = H.whole(H.tup(H.text("module"), H.glob("mypkg", "Net"), H.text("f.py"), H.text("src")) + b"Q)\x81")
    assert scan_pickle(module_pid).unknown == ["mypkg.Net"]
    tar_pid = H.whole(H.tup(H.glob("somepkg", "Run"), H.TRUE) + b"Q" + H.tup(H.text("x")) + b"R")
    assert scan_pickle(tar_pid).unknown == ["somepkg.Run"]
    named = H.whole(H.tup(H.text("os"), H.TRUE) + b"Q" + H.text("system") + b"\x93")
    assert "<STACK_GLOBAL with a computed name>" in scan_pickle(named).unsafe
