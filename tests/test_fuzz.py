"""CI-sized fuzz run of the CLI, in-process: mutated model files (plain lint) and mutated --data arrays.

Every input must end in exit 0, 1 or 2, print no traceback and no "internal error" (the CLI's
safety net is a crash site, not a pass), finish within TIME_BOUND seconds, and never run a
payload (no file in the marker folder, /tmp/bnlint_pwned_marker untouched). Seeds are fixed, so
a run is reproducible; bench/fuzz.py runs the same generator much longer, one process per input.

Each input is written to `<pytest basetemp>/fuzzN/<role>-<seed>/` before it runs and removed when
it passes, so a failure (or a hard hang that faulthandler ends) leaves it on disk; the message
names the folder and the command line to reproduce it.
"""

from __future__ import annotations

import faulthandler
import shutil
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from bnlint.cli import main
from tests.fuzz_inputs import data_args, generate

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_MARKER = Path("/tmp/bnlint_pwned_marker")
TIME_BOUND = 10.0  # seconds per input
# A bug caught by a safety net: the CLI's, or the Keras preflight child's (an unexpected exit there).
INTERNAL_MARKERS = ("internal error", "isolated reader failed")
# About 60 s on two cores: model inputs are cheap (tens of ms; Keras files also get a forked
# preflight read), --data inputs run a model over up to a few hundred samples.
LINT_CHUNKS, LINT_PER_CHUNK = 10, 200
DATA_CHUNKS, DATA_PER_CHUNK = 8, 60


class InputTimedOut(BaseException):
    """Raised by SIGALRM inside the CLI: a BaseException so that no `except Exception` swallows it."""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("BNLINT_DEBUG", "NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    yield


def _alarm(signum: int, frame: object) -> None:
    raise InputTimedOut()


def _run_one(work: Path, seed: int, role: str) -> str | None:
    """Run one generated input; None when it passes, else why (the input stays on disk)."""
    folder = work / f"{role}-{seed}"
    markers = work / "markers"
    markers.mkdir(exist_ok=True)
    item = generate(seed, role, markers)
    path = item.write(folder / "in")
    if role == "data":
        model, *rest = data_args(seed)
        args = [model, *rest, "--data", str(path), "--device", "cpu", "--color", "never"]
    else:
        args = [str(path), "--color", "never"]
    (folder / "command.txt").write_text(f"{item.describe()}\nbnlint {' '.join(args)}\n")
    fixture_marker = FIXTURE_MARKER.stat().st_mtime if FIXTURE_MARKER.exists() else None
    previous = signal.signal(signal.SIGALRM, _alarm)
    faulthandler.dump_traceback_later(3 * TIME_BOUND, exit=True)  # a hang in C code, which SIGALRM cannot interrupt
    start = time.monotonic()
    problem = None
    try:
        signal.setitimer(signal.ITIMER_REAL, TIME_BOUND)
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    except InputTimedOut:
        problem = f"no result within {TIME_BOUND:g} s (a hang)"
    except BaseException as exc:  # noqa: BLE001 - anything escaping the CLI is the finding
        problem = f"the CLI raised {type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - start
    if problem is None:
        output = result.output + (result.stderr if result.stderr not in result.output else "")
        if result.exit_code not in (0, 1, 2):
            problem = f"exit code {result.exit_code}"
        elif "Traceback" in output:
            problem = "a traceback in the output"
        elif any(marker in output for marker in INTERNAL_MARKERS):
            problem = "an internal error (the CLI's safety net, or a bug in the isolated Keras reader)"
        elif elapsed > TIME_BOUND:
            problem = f"took {elapsed:.1f} s (bound {TIME_BOUND:g} s)"
        if problem:
            (folder / "output.txt").write_text(output)
            problem += f": {(output.strip().splitlines() or [''])[-1][:300]}"
    if any(markers.iterdir()) or (FIXTURE_MARKER.exists() and FIXTURE_MARKER.stat().st_mtime != fixture_marker):
        problem = "a payload ran (marker file created)"
    if problem is None:
        shutil.rmtree(folder)
        return None
    return f"{item.describe()}\n  {problem}\n  input kept in {folder} (command in command.txt)"


def _check(work: Path, seeds: range, role: str) -> None:
    failures = [why for seed in seeds if (why := _run_one(work, seed, role)) is not None]
    assert not failures, f"{len(failures)} of {len(seeds)} inputs failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("chunk", range(LINT_CHUNKS))
def test_mutated_model_files_end_in_one_line(work: Path, chunk: int) -> None:
    _check(work, range(chunk * LINT_PER_CHUNK, (chunk + 1) * LINT_PER_CHUNK), "lint")


@pytest.mark.parametrize("chunk", range(DATA_CHUNKS))
def test_mutated_data_files_end_in_one_line(work: Path, chunk: int) -> None:
    _check(work, range(chunk * DATA_PER_CHUNK, (chunk + 1) * DATA_PER_CHUNK), "data")


def test_generator_is_deterministic(tmp_path: Path) -> None:
    for role in ("lint", "data"):
        for seed in (0, 7, 123):
            one, two = generate(seed, role, tmp_path), generate(seed, role, tmp_path)
            assert one.files == two.files and one.mutations == two.mutations


def test_hostile_seeds_aim_their_payload_at_the_marker_folder(tmp_path: Path) -> None:
    """The execution check is only as good as the payloads: each must name the watched marker file."""
    import random

    from tests.fuzz_inputs import MARKER_NAME, _hostile_seed

    rng = random.Random(0)
    seeds = [_hostile_seed(rng, tmp_path) for _ in range(30)]
    aimed = [name for name, data in seeds if str(tmp_path / MARKER_NAME).encode() in data]
    # Most payloads write the marker; a few attack otherwise (torch.hub.load, overwriting os.path.join).
    assert len(aimed) >= 20, sorted(name for name, _ in seeds)
