"""The command-line options `check` and `fix` share, declared once, and the typed objects each
command builds from click's parameters in one place.

A shared option is one `click.option` in COMMON_OPTIONS, applied to both commands by
`common_options`: its help text, default and validation cannot drift between them. What the
shared values mean is parsed once too (`CommonOptions.validate`), so `--input x` or a bad
`--arch-kwargs` is the same error line from either command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import click

if TYPE_CHECKING:  # bnlint.fix.run imports numpy: only when fix runs
    from bnlint.fix.run import FixOptions

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound="CommonOptions")

TRUST_HELP = ("Allow running code from the input file: a pickled nn.Module, TorchScript whose code is not recognised "
              "as pure tensor computation, a Keras Lambda layer, a TensorFlow SavedModel with ops outside bnlint's vetted "
              "arithmetic (file or Python ops). Only for files you trust.")
TIMEOUT_HELP = "wall-clock limit for running the model in its isolated child (default: sized to the model and data)"


def _timeout(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """--timeout: a positive, finite number of seconds (click's FloatRange lets NaN and inf through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"expected a positive number of seconds, got {value}")
    return value


# In the order both helps list them.
COMMON_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    click.option("--quiet", "-q", is_flag=True,
                 help="Less output: check prints the findings only (no summary, no progress); fix prints what was done and "
                      "written only (no per-layer table, no notes)."),
    click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="Read settings from this TOML file instead of the nearest pyproject.toml/bnlint.toml."),
    click.option("--input", "inputs", multiple=True, metavar="NAME=KEY", help="Map a model input to an array in --data (repeatable)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=None,
                 help="Batch size for the passes over --data [default: the config's, else 32]."),
    click.option("--arch", default=None, metavar="MODULE:FACTORY",
                 help="Architecture for state dicts: package.module:factory or path/to/file.py:factory."),
    click.option("--arch-kwargs", default=None, metavar="JSON", help='Keyword arguments for the factory, e.g. \'{"num_classes": 10}\'.'),
    click.option("--trust", is_flag=True, help=TRUST_HELP),
    click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None,
                 help="Where the model runs on --data [default: the config's device, else auto: cuda when available]."),
    click.option("--timeout", type=float, default=None, callback=_timeout, metavar="SECONDS", help=TIMEOUT_HELP),
    click.option("--onnx-engine", type=click.Choice(["onnxruntime", "reference", "auto"]), default=None,
                 help="How ONNX models run on --data [default: the config's, else auto: onnxruntime when installed]."),
    click.option("--debug", is_flag=True, help="Show the traceback of an internal error instead of one line."),
)


def common_options(command: F) -> F:
    """Apply every shared option to a command (click lists decorators bottom-up, hence reversed)."""
    for option in reversed(COMMON_OPTIONS):
        command = option(command)
    return command


@dataclass(frozen=True, kw_only=True)
class CommonOptions:
    """The shared options' values as click parsed them (None: not given; the config's, then the default)."""

    quiet: bool = False
    config_path: str | None = None
    inputs: tuple[str, ...] = ()
    batch_size: int | None = None
    arch: str | None = None
    arch_kwargs: str | None = None
    trust: bool = False
    device: str | None = None
    timeout: float | None = None
    onnx_engine: str | None = None
    debug: bool = False

    @classmethod
    def from_click(cls: type[C], **params: Any) -> C:
        """The command's options from click's keyword arguments; a parameter without a field is a
        TypeError, so a new click option cannot be dropped on the way to the command body."""
        return cls(**params)

    def input_map(self) -> dict[str, str]:
        """--input NAME=KEY pairs (a UsageError for a malformed pair)."""
        from bnlint.dynamic.options import parse_inputs

        return parse_inputs(self.inputs)

    def factory_kwargs(self) -> dict[str, Any]:
        """--arch-kwargs as a mapping (a UsageError for JSON that is not an object)."""
        from bnlint.dynamic.options import parse_arch_kwargs

        return parse_arch_kwargs(self.arch_kwargs)

    def validate(self) -> None:
        """The checks click cannot make, in one place for both commands: the same bad value is the
        same error line whether or not --data is given."""
        self.input_map()
        self.factory_kwargs()


@dataclass(frozen=True, kw_only=True)
class CheckOptions(CommonOptions):
    """Everything `bnlint check` was given."""

    paths: tuple[str, ...] = ()
    fmt: str = "text"
    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    fail_on: str | None = None
    output: str | None = None
    color: str = "auto"
    deploy_precision: str | None = None
    reference: str | None = None
    data: str | None = None
    train_batch_size: int | None = None
    baseline: str | None = None
    skip_unrecognised: bool = False
    write_baseline: bool = False
    show_fixes: bool = False
    group: bool | None = None  # None: information repeated on many layers shares a line
    statistics: bool = False
    exit_zero: bool = False
    jobs: int = 1
    exclude: tuple[str, ...] = ()
    report_path: str | None = None
    plot_path: str | None = None


@dataclass(frozen=True, kw_only=True)
class FixCommandOptions(CommonOptions):
    """Everything `bnlint fix` was given, before the config fills the defaults (bnlint.fix.run.FixOptions)."""

    model: str = ""
    data: str | None = None
    output: str | None = None
    in_place: bool = False
    dry_run: bool = False
    layers: str | None = None
    fold: bool = False
    min_samples: int | None = None
    fmt: str = "text"
    report_path: str | None = None

    def resolved(self, settings: Any, device: str, process_group: Any) -> FixOptions:
        """The FixOptions the fix runs with: flags win over [tool.bnlint.dynamic] (`settings`), as
        for linting (read by key: a dict or bnlint.settings.DynamicThresholds); `device` is already
        resolved (bnlint.cli._fix_device)."""
        from bnlint.fix.run import FixOptions

        return FixOptions(model=self.model, data=self.data, output=self.output, in_place=self.in_place, layers=self.layers,
                          dry_run=self.dry_run, fold=self.fold, arch=self.arch, arch_kwargs=self.factory_kwargs(), trust=self.trust,
                          inputs=self.input_map(), batch_size=self.batch_size or settings.batch_size, device=device,
                          onnx_engine=self.onnx_engine or settings.onnx_engine, process_group=process_group, timeout=self.timeout,
                          **({"min_samples": self.min_samples} if self.min_samples is not None else {}))


def folder_format(path: str) -> str | None:
    """The description of the folder format `path` is one model of (a SavedModel directory), else None."""
    from bnlint.formats import folder_format as record_of

    record = record_of(path)
    return record.description if record is not None else None


def check_fix_output(model: str, output: str | None) -> None:
    """-o names what the fix writes: a file for a file model, a folder for a folder-format model.
    Both mistakes are one UsageError line (click's dir_okay cannot know which the model is)."""
    import os

    from bnlint.errors import UsageError

    if not output or not os.path.lexists(output):
        return
    kind = folder_format(model)
    if kind is None and os.path.isdir(output):
        raise UsageError(f"--output {output}: is a folder; {model} is one file, so -o names the file to write")
    if kind is not None and not os.path.isdir(output):
        raise UsageError(f"--output {output}: is not a folder; {model} is a {kind} (a folder), so -o names the folder to write")
