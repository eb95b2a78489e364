"""Run a model in a child process that cannot hurt the machine, and bring back what it measured.

Every execution of a model file (torch eager and TorchScript, onnxruntime, Keras; `--data` and
`bnlint fix`) goes through `run_job`. The child (bnlint.sandbox.child):

- starts from a clean interpreter (`python -I`) with a scrubbed environment: only locale, paths
  and the numeric libraries' own settings pass; CI tokens and cloud credentials do not, and
  HOME and TMPDIR point into a private folder;
- restricts itself with Landlock before it reads the model: read-only beneath the Python
  installation, the system libraries, the model's folder, the data and the --arch file (the whole
  file system with --trust, whose code needs its imports), read-write beneath the private folder
  only, no TCP; and a seccomp filter allowing no socket but AF_UNIX;
- has a wall-clock deadline and a memory limit, both enforced from here (the whole process group
  is killed), and a data-segment limit set in the child for CPU runs;
- sends its result as JSON and numeric arrays (bnlint.sandbox.codec), never a pickle.

A deadline, a memory overrun, a crash in native code (SIGSEGV, abort) or a child that ends
without a result is one `ModelRunError` line naming what the child was doing; the caller keeps
the file's static findings. Where the kernel has no Landlock the run says so in a note and the
allowlists (pickle policy, TorchScript graph check, Keras safe mode) are the only wall.
"""

from __future__ import annotations

import glob
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlint.errors import BnlintError, DataError, InputError, NotAModel, TrustRequired, UsageError
from bnlint.formats import plugin_modules

# Environment variables a model run may see: locale, library search paths and the numeric
# libraries' threading and CPU-feature settings. Everything else (tokens, credentials) is dropped.
ENV_KEEP = ("PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "KERAS_BACKEND", "CUDA_VISIBLE_DEVICES",
            "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
            "TORCH_CPP_LOG_LEVEL", "BNLINT_DEBUG", "NO_COLOR", "TERM")
ENV_KEEP_PREFIXES = ("LC_",)
# Files outside the Python installation that runtimes read: the dynamic loader's cache, time zone,
# user database (getpass), CPU, memory and cgroup facts. Of /proc only the child's own entries and
# machine-wide facts: another process's /proc/PID/environ (the parent's, with its secrets) stays
# closed. (/proc/self is resolved by the child itself when it applies the rules.)
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/ld.so.conf",
               "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf",
               "/proc/self", "/proc/thread-self", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/filesystems",
               "/proc/sys/kernel", "/proc/sys/vm", "/proc/driver", "/sys",
               "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/full")
DEFAULT_TIMEOUT_S = 120.0
MAX_EVENT_LINE = 1 << 16
POLL_S = 0.1


class ModelRunError(InputError):
    """Running the model in its isolated child did not finish: deadline, memory, crash. Exit code 2."""


@dataclass
class Walls:
    """What isolated the last run (for notes and tests)."""

    landlock: int = 0  # the Landlock ABI applied (0: none)
    seccomp: bool = False


@dataclass
class Outcome:
    result: Any
    walls: Walls
    folder: Path  # the private folder (holds a staged fix output); the caller removes it
    notes: list[str] = field(default_factory=list)


def default_timeout(files: list[str | None]) -> float:
    """A deadline sized to the work: 120 s, plus 1 s per (model MB x data MB) / 50.

    Compute grows with the model's size times the amount of data (ResNet-50, 98 MB, on 154 MB of
    224x224 images gets 422 s, several times what two CPU cores need; a 5 MB MobileNet on 500 MB
    of images 170 s). A deadline that fires on a healthy run is a false alarm, so the default is
    generous: it exists to end runs that would never end. --timeout overrides it.
    """
    sizes = []
    for name in files[:2]:
        try:
            sizes.append(_tree_size(Path(name)) / 1e6 if name else 1.0)
        except OSError:
            sizes.append(1.0)
    model, data = (sizes + [1.0, 1.0])[:2]
    return DEFAULT_TIMEOUT_S + max(model, 1.0) * max(data, 1.0) / 50.0


def _tree_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _memory_limit() -> int:
    """80% of physical memory (BNLINT_MEMORY_LIMIT_MB sets another, for containers whose limit is
    lower than the machine's): a hostile or runaway model is stopped before the machine swaps."""
    configured = os.environ.get("BNLINT_MEMORY_LIMIT_MB", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured) << 20
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _max_file_bytes(job: dict[str, Any]) -> int:
    """The largest file the child may write: a fixed copy of the model and then some (1 GiB + 2x)."""
    model = job.get("model") or job.get("options", {}).get("model")
    try:
        size = _tree_size(Path(model).resolve().parent) if model else 0
    except OSError:
        size = 0
    return (1 << 30) + 2 * size


def _environment(private: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_KEEP or k.startswith(ENV_KEEP_PREFIXES)}
    env.update(HOME=str(private), TMPDIR=str(private), KERAS_HOME=str(private / ".keras"), MPLCONFIGDIR=str(private),
               PYTHONDONTWRITEBYTECODE="1")
    return env


def _python_paths() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sysconfig.get_paths().values() if p)
    paths.update(p for p in sys.path if p)
    paths.add(str(Path(__file__).resolve().parents[1]))  # the bnlint package itself
    return sorted(paths)


def _gpu_devices() -> list[str]:
    return sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/dri/*") + ["/dev/shm"])


def _policy(reads: list[str], private: Path, trust: bool, gpu: bool) -> dict[str, list[str]]:
    read = ["/"] if trust else [*_python_paths(), *SYSTEM_READ, *reads]
    devices = _gpu_devices() if gpu else []
    write = [str(private), *(["/dev/shm"] if gpu else [])]
    return {"read": sorted(set(read)), "write": write, "devices": [d for d in devices if d != "/dev/shm"]}


def arch_is_module(arch: str | None) -> bool:
    """--arch names an importable module (`pkg.mod:factory`, looked up from the working directory)
    rather than a file (`path/file.py:factory`)."""
    return bool(arch) and not arch_target(str(arch)).endswith(".py")


def arch_target(arch: str) -> str:
    """The module or file part of --arch (`path/file.py` of `path/file.py:factory`)."""
    return arch.rpartition(":")[0] if ":" in arch else arch


def _sys_path(arch_module: bool) -> list[str]:
    """The child's import path: the parent's, without the working directory unless --arch names a
    module to import from it."""
    cwd = os.path.abspath(os.getcwd())
    keep = []
    for entry in sys.path:
        absolute = os.path.abspath(entry) if entry else cwd
        if absolute == cwd and not arch_module:
            continue
        keep.append(absolute)
    if arch_module and cwd not in keep:
        keep.insert(0, cwd)
    package_root = str(Path(__file__).resolve().parents[2])
    if package_root not in keep:
        keep.append(package_root)
    return keep


BOOT = "import sys, json; sys.path[:] = json.loads(sys.argv[1]); from bnlint.sandbox.child import main; main()"


def _wants_gpu(device: str | None) -> bool:
    return device in ("cuda", "auto", None) and bool(glob.glob("/dev/nvidia*"))


class _ForkedChild:
    """A child forked by the fork server, with the parts of Popen that supervision uses."""

    def __init__(self, server: Any, pid: int, events: int) -> None:
        self.server, self.pid = server, pid
        self.stdout: Any = os.fdopen(events, "rb", buffering=0)
        self.returncode: int | None = None

    def _collect(self, timeout: float | None) -> None:
        from bnlint.sandbox.forkserver import receive

        self.server.sock.settimeout(timeout)
        try:
            message, _ = receive(self.server.sock)
        except (TimeoutError, BlockingIOError):
            return
        except (OSError, ValueError):
            message = None
        finally:
            self.server.sock.settimeout(None)
        if not isinstance(message, dict) or not isinstance(message.get("status"), int):
            self.returncode = -signal.SIGKILL  # the server is gone: so is its child (PR_SET_PDEATHSIG)
            return
        self.returncode = os.waitstatus_to_exitcode(message["status"])

    def poll(self) -> int | None:
        if self.returncode is None:
            self._collect(0.01)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            self._collect(timeout)
        return self.returncode


def _fork(job: dict[str, Any], env: dict[str, str], sys_path: list[str], preload: list[str], server_env: dict[str, str]) -> Any:
    """The job's child from the fork server, or None when no server can be used."""
    from bnlint.sandbox import forkserver

    if not forkserver.enabled():
        return None
    read, write = os.pipe()
    try:
        server = forkserver.server_for(sys_path, server_env)
        forkserver.send(server.sock, {"job": job, "env": env, "preload": preload}, [write])
        os.close(write)
        write = -1
        server.sock.settimeout(120)  # the server imports the engine first: seconds, not minutes
        try:
            message, _ = forkserver.receive(server.sock)
        finally:
            server.sock.settimeout(None)
        if not isinstance(message, dict) or not isinstance(message.get("pid"), int):
            raise OSError("the fork server did not start the run")
        return _ForkedChild(server, message["pid"], read)
    except (OSError, ValueError):
        forkserver.forget(sys_path)
        os.close(read)
        return None
    finally:
        if write >= 0:
            os.close(write)


_server_home: list[Path] = []


def _server_environment() -> dict[str, str]:
    """The fork server's own environment: scrubbed like a child's, with a private home of its own."""
    if not _server_home:
        _server_home.append(Path(tempfile.mkdtemp(prefix="bnlint-server-")))
    return _environment(_server_home[0])


def run_job(job: dict[str, Any], *, reads: list[str], trust: bool, device: str | None, timeout: float,
            describe: str, preload: list[str] | None = None) -> Outcome:
    """Run `job` (see bnlint.sandbox.child) isolated; return its decoded result or raise one-line errors.

    `reads`: files and folders the job must read (model, companion, data, --arch file). `describe`
    is the path errors are attributed to.
    """
    from bnlint.sandbox import codec
    from bnlint.sandbox.landlock import abi_version

    if not (timeout > 0 and timeout < float("inf")):
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout}")
    private = Path(tempfile.mkdtemp(prefix="bnlint-run-"))
    gpu = _wants_gpu(device)
    arch = job.get("options", {}).get("arch") or ""
    arch_module = arch_is_module(arch)
    reads = [str(Path(r).resolve()) for r in reads if r] + ([os.getcwd()] if arch_module else [])
    memory = _memory_limit()
    job = {**job, "out": str(private), "policy": _policy(reads, private, trust, gpu), "memory_bytes": memory,
           "limit_data": not gpu, "max_file_bytes": _max_file_bytes(job), "cwd": os.getcwd(),
           "plugins": plugin_modules()}
    sys_path = _sys_path(arch_module)
    stderr_path = private / "stderr.txt"
    outcome = Outcome(None, Walls(), private)
    try:
        child: Any = _fork(job, _environment(private), sys_path, preload or [], _server_environment())
        if child is None:
            with open(stderr_path, "wb") as stderr:
                child = subprocess.Popen([sys.executable, "-I", "-c", BOOT, json.dumps(sys_path)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, env=_environment(private),
                                         start_new_session=True, close_fds=True)
            _send_job(child, json.dumps(job))
        try:
            events = _supervise(child, timeout, memory, describe)
        finally:
            _kill(child)
        outcome.walls = Walls(**events.walls)
        if not outcome.walls.landlock:
            outcome.notes.append("the model ran without Landlock (the kernel has none: "
                                 f"ABI {abi_version()}); the pickle, TorchScript and Keras allowlists were the only wall")
        if events.error is not None:
            raise _rebuild_error(events.error, describe, stderr_path)
        if child.returncode != 0 or not events.done:
            raise ModelRunError(describe, _ended(child.returncode, events, stderr_path))
        try:
            outcome.result = codec.decode(private)
        except codec.ResultError as exc:
            raise ModelRunError(describe, f"the isolated run sent back a result bnlint cannot use: {exc}") from None
        return outcome
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise


@dataclass
class _Events:
    stage: str = "starting"
    layer: str | None = None
    progress: tuple[int, int] | None = None
    walls: dict[str, Any] = field(default_factory=lambda: {"landlock": 0, "seccomp": False})
    done: bool = False
    error: dict[str, Any] | None = None

    def where(self) -> str:
        text = self.stage
        if self.progress and self.progress[1]:
            text += f", {self.progress[0]} of {self.progress[1]} samples done"
        if self.layer:
            text += f", last BatchNorm measured: {self.layer}"
        return text

    def take(self, line: bytes) -> None:
        try:
            event = json.loads(line[:MAX_EVENT_LINE])
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(event, dict):
            return
        if isinstance(event.get("stage"), str):
            self.stage = event["stage"][:200]
        if isinstance(event.get("layer"), str):
            self.layer = event["layer"][:200]
        progress = event.get("progress")
        if isinstance(progress, list) and len(progress) == 2 and all(isinstance(v, int) for v in progress):
            self.progress = (progress[0], progress[1])
            _show_progress(self.progress)
        walls = event.get("walls")
        if isinstance(walls, dict) and isinstance(walls.get("landlock"), int) and isinstance(walls.get("seccomp"), bool):
            self.walls = {"landlock": walls["landlock"], "seccomp": walls["seccomp"]}
        if event.get("done") is True:
            self.done = True
        if isinstance(event.get("error"), dict):
            self.error = event["error"]


_progress_bar: Any = None


def _show_progress(progress: tuple[int, int]) -> None:
    global _progress_bar
    from bnlint.dynamic.runner import Progress

    if _progress_bar is None or _progress_bar.total != max(progress[1], 1):
        _progress_bar = Progress(progress[1], "bnlint: running the model on the data", quiet=_QUIET[0])
    _progress_bar.update(progress[0])


_QUIET = [False]


def _send_job(child: subprocess.Popen[bytes], job: str) -> None:
    assert child.stdin is not None  # noqa: S101 - Popen with a stdin pipe
    try:
        child.stdin.write(job.encode("utf-8"))
        child.stdin.close()
    except BrokenPipeError:
        pass


def _supervise(child: Any, timeout: float, memory: int, describe: str) -> _Events:
    """Read the child's events until it ends; kill it at the deadline or over the memory limit."""
    events = _Events()
    deadline = time.monotonic() + timeout
    buffer = b""
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    open_stream = True
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                _kill(child)
                raise ModelRunError(describe, f"stopped after {timeout:g} s (--timeout): the model was still running "
                                    f"({events.where()}); a larger --timeout gives it longer, but a model this slow on "
                                    "this data may loop forever")
            rss = _rss(child.pid)
            if rss > memory:
                _kill(child)
                raise ModelRunError(describe, f"stopped: the model used {rss >> 20} MiB of memory, over the limit of "
                                    f"{memory >> 20} MiB ({events.where()})")
            if not open_stream:
                if child.poll() is not None:
                    break
                time.sleep(POLL_S)
                continue
            if selector.select(min(POLL_S, max(deadline - now, 0.0))):
                chunk = os.read(child.stdout.fileno(), 1 << 16)
                if not chunk:
                    open_stream = False
                    selector.unregister(child.stdout)
                    continue
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_EVENT_LINE:
                    buffer = b""  # an overlong line is dropped, never buffered without bound
                for line in lines:
                    events.take(line)
    finally:
        selector.close()
        if _progress_bar is not None:
            _progress_bar.close()
    return events


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kill(child: Any) -> None:
    """End the child and everything it started (its own process group); reap it; close its pipe."""
    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:  # a forked child killed before its setsid() has no group yet
                os.kill(child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if child.stdout is not None:
        child.stdout.close()


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(path.stat().st_size - 4096, 0))
            lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _ended(code: int | None, events: _Events, stderr_path: Path) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = {"SIGSEGV": "a crash in native code", "SIGABRT": "an abort in native code", "SIGBUS": "a crash in native code",
               "SIGILL": "an illegal instruction", "SIGFPE": "an arithmetic fault", "SIGKILL": "killed (out of memory?)",
               "SIGSYS": "a forbidden system call"}.get(name, "a signal")
        text = f"the model's runtime crashed ({name}: {why}) while {events.where()}"
    else:
        text = f"the isolated run ended without a result (exit {code}) while {events.where()}"
    last = _last_line(stderr_path)
    return f"{text}: {last}" if last else text


def _rebuild_error(error: dict[str, Any], describe: str, stderr_path: Path) -> BnlintError:
    """The child's one-line error, as the same kind of error here (its text is shown, never run)."""
    kinds: dict[str, type[InputError]] = {"InputError": InputError, "DataError": DataError, "TrustRequired": TrustRequired,
                                          "NotAModel": NotAModel, "ModelRunError": ModelRunError}
    kind = error.get("type")
    path, problem, message = (str(error.get(k, ""))[:2000] for k in ("path", "problem", "message"))
    if isinstance(kind, str) and kind in kinds:
        return kinds[kind](path or describe, problem or message)
    if kind == "UsageError":
        return UsageError(message)
    if isinstance(kind, str) and kind.endswith("Error") and kind != "internal" and "path" in error:
        return InputError(path or describe, problem)
    if kind != "internal" and message:
        return BnlintError(message)  # a usage or recalibration error of the job: its line as it was
    if os.environ.get("BNLINT_DEBUG"):
        sys.stderr.write(str(error.get("traceback", ""))[:4000] + "\n")
    return ModelRunError(describe, f"internal error while running the model: {message} (please report it; "
                         "BNLINT_DEBUG=1 or --debug shows the traceback)")


def set_quiet(quiet: bool) -> None:
    _QUIET[0] = quiet


__all__ = ["ModelRunError", "Outcome", "Walls", "default_timeout", "run_job", "set_quiet"]
