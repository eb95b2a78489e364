"""The isolated child: restrict itself, then measure (or fix) one model and write the result as data.

Started by `bnlint.sandbox.isolate` as `python -I -c <boot>`, with a scrubbed environment and a
private folder. The job arrives as JSON on stdin. Before it reads anything of the model it:

1. moves its own stdout aside: the protocol goes to a private copy of fd 1, and fd 1 becomes
   stderr, so nothing the model prints can forge a protocol line;
2. limits its data segment (CPU runs) and turns off core dumps;
3. applies the Landlock ruleset and the seccomp socket filter the parent chose (bnlint.sandbox.landlock).

Then it runs the same code an unisolated run would (bnlint.dynamic.analysis.measure,
bnlint.fix.run.fix_in_child) and writes the result with bnlint.sandbox.codec. Errors are sent as
one event {"error": {...}}: the parent raises the same kind of one-line error.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from pathlib import Path
from typing import IO, Any

from bnlint.errors import BnlintError, InputError, UsageError
from bnlint.sandbox import events


def _protocol_stream() -> IO[str]:
    fd = os.dup(1)
    os.dup2(2, 1)  # print() from the model lands in the parent's stderr capture, not in the protocol
    sys.stdout = os.fdopen(1, "w", closefd=False)
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8")


def _limit(job: dict[str, Any]) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if job.get("max_file_bytes"):  # no file the child writes (a fixed model, a log) fills the disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(job["max_file_bytes"]), int(job["max_file_bytes"])))
    memory = job.get("memory_bytes")
    if memory and job.get("limit_data"):
        resource.setrlimit(resource.RLIMIT_DATA, (int(memory), int(memory)))


def _wall(job: dict[str, Any]) -> dict[str, Any]:
    from bnlint.sandbox.landlock import Policy, deny_network, restrict

    policy = job["policy"]
    abi = restrict(Policy(tuple(policy["read"]), tuple(policy["write"]), tuple(policy["devices"])))
    return {"landlock": abi, "seccomp": deny_network()}


def _run(job: dict[str, Any], out: Path) -> None:
    import importlib

    from bnlint.config import Config
    from bnlint.sandbox import codec

    for module in job.get("plugins") or ():  # formats registered by plugins, as in the parent
        importlib.import_module(module)
    raw = job["config"]
    config = Config(select=tuple(raw["select"]), ignore=tuple(raw["ignore"]), fail_on=raw["fail_on"],
                    per_layer_ignores={k: tuple(v) for k, v in raw["per_layer_ignores"].items()},
                    thresholds=raw["thresholds"], dynamic=raw["dynamic"], exclude=tuple(raw["exclude"]), source=raw["source"])
    if job["kind"] == "measure":
        from bnlint.dynamic.analysis import measure
        from bnlint.dynamic.options import DynamicOptions
        from bnlint.loaders import load_model

        events.stage("loading the model")
        model = load_model(job["model"], job.get("companion"))
        model.path = job["model"]
        result: Any = measure(model, DynamicOptions(**job["options"]), config)
    elif job["kind"] == "fix":
        from bnlint.fix.run import FixOptions, fix_in_child

        options = dict(job["options"])
        options["arch_kwargs"] = options.get("arch_kwargs") or {}
        result = fix_in_child(FixOptions(**options), config, job.get("staged"), out)
    else:
        raise UsageError(f"unknown job {job['kind']!r}")
    events.stage("writing the result")
    codec.encode(result, out)


def _error_event(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, InputError):
        return {"type": type(exc).__name__, "path": exc.path, "problem": exc.problem}
    if isinstance(exc, BnlintError):
        return {"type": type(exc).__name__, "message": str(exc)}
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return {"type": "internal", "message": f"{type(exc).__name__}: {text}", "traceback": traceback.format_exc()[-4000:]}


def _die_with_parent() -> None:
    """SIGKILL when the process that started us ends: a child never outlives its run."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def execute(job: dict[str, Any], protocol: IO[str]) -> None:
    """Restrict, run the job, send the ending; never returns (os._exit: no teardown runs model code)."""
    events.install(protocol)
    out = Path(job["out"])
    try:
        _die_with_parent()
        _limit(job)
        walls = _wall(job)
        events._send({"walls": walls})
        _run(job, out)
        events._send({"done": True})
    except BaseException as exc:  # noqa: BLE001 - every ending becomes one event for the parent
        events._send({"error": _error_event(exc)})
        protocol.flush()
        os._exit(3)
    protocol.flush()
    os._exit(0)


def main() -> None:
    """Entry point of a child started as its own interpreter (job on stdin)."""
    protocol = _protocol_stream()
    job = json.loads(sys.stdin.read())
    execute(job, protocol)


def forked(job: dict[str, Any], env: dict[str, str], events_fd: int) -> None:
    """Entry point of a child forked by the fork server (bnlint.sandbox.forkserver): it takes the
    job's environment and its own stderr file, then runs like `main`."""
    os.setsid()  # its own process group: the parent's deadline kills it and everything it starts
    os.environ.clear()
    os.environ.update(env)
    os.chdir(job["cwd"])  # the parent's working directory now, not the server's when it started
    stderr = os.open(os.path.join(job["out"], "stderr.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(stderr, 1)
    os.dup2(stderr, 2)
    os.close(null)
    os.close(stderr)
    execute(job, os.fdopen(events_fd, "w", buffering=1, encoding="utf-8"))
