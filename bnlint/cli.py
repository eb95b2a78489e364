"""Command-line wiring only: parse flags, build a Config, call the API, pick a reporter, exit.

Exit codes: 0 clean (nothing at or above --fail-on), 1 findings at or above it,
2 bad usage or at least one input that could not be read (other files are still linted).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import click

from bnlint import __version__
from bnlint.cli_options import CheckOptions, FixCommandOptions, check_fix_output, common_options
from bnlint.errors import BnlintError, UsageError
from bnlint.report import FORMATS

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


class DefaultCheckGroup(click.Group):
    """`bnlint PATH...` means `bnlint check PATH...`; `bnlint rules`, `bnlint rule CODE` stay commands.

    `bnlint --help` shows the lint options too, since linting is what `bnlint PATH` does.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version", "-V"):
            args = ["check", *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help(ctx, formatter)
        command = self.commands.get("check")
        if command is None:
            return
        with click.Context(command, info_name="check", parent=ctx) as sub:
            rows = [row for param in command.get_params(sub) if (row := param.get_help_record(sub)) is not None]
        with formatter.section("Lint options (bnlint PATH... is bnlint check PATH...)"):
            formatter.write_dl(rows)


# First bytes of files that are models whatever their name: zip (torch, .keras), HDF5, pickle.
_MODEL_MAGIC = (b"PK\x03\x04", b"\x89HDF", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _refuse_overwrite(targets: dict[str, str | None], inputs: Sequence[str | None]) -> None:
    """A report, plot or baseline is never written over an input or over anything that looks like
    a model: a file named `-omodel.pt` given without `--` would otherwise replace model.pt."""
    from bnlint.loaders import is_model_file

    given = [Path(p) for p in inputs if p]
    for flag, target in targets.items():
        if not target:
            continue
        path = Path(target)
        if is_model_file(path) or path.suffix.lower() in (".npz", ".npy", ".data", ".toml"):
            raise UsageError(f"{flag} {target}: refusing to write over a model, data or settings file name "
                             "(a file name that starts with '-' belongs after `--`)")
        if not os.path.lexists(path):
            continue
        for source in given:
            try:
                same = os.path.samefile(path, source)
            except (OSError, ValueError):
                same = False
            if same:
                raise UsageError(f"{flag} {target}: refusing to write over the input {source}")
        try:
            if path.is_file():
                with open(path, "rb") as handle:
                    head = handle.read(8)
                if head.startswith(_MODEL_MAGIC):
                    raise UsageError(f"{flag} {target}: refusing to write over a file that holds a model")
        except OSError:
            pass  # unreadable: the write reports it


def _not_regular(paths: Sequence[str]) -> tuple[list[str], list[Any]]:
    """Split command-line paths into those to lint and FileResults with an error for the pipes,
    sockets and devices among them: opening a named pipe would wait forever for a writer."""
    from bnlint.discovery import non_regular
    from bnlint.findings import FileError, FileResult

    keep: list[str] = []
    refused: list[Any] = []
    for raw in paths:
        kind = non_regular(Path(raw))
        if kind is None:
            keep.append(raw)
        else:
            message = f"not a regular file ({kind}): not read"
            refused.append(FileResult(path=raw, error=FileError(path=raw, message=message)))
    return keep, refused


def _side_file(flag: str, path: str | None, folder_ok: bool = False) -> None:
    """--reference / --data name a regular file (or, for --data, a folder): never a pipe or device."""
    from bnlint.discovery import non_regular

    if path and (kind := non_regular(Path(path))) is not None:
        raise UsageError(f"{flag} {path}: not a regular file{' or folder' if folder_ok else ''} ({kind})")


def _split_codes(values: Sequence[str], flag: str = "--select") -> tuple[str, ...] | None:
    """Comma-separated rule codes, prefixes or rule names (`frozen-bn-in-train-mode`) as codes."""
    from bnlint.selection import rule_codes

    codes = rule_codes([c for v in values for c in v.split(",")], flag)
    return codes or None


@click.group(cls=DefaultCheckGroup, context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(__version__, "--version", "-V", prog_name="bnlint")
@click.pass_context
def main(ctx: click.Context) -> None:
    """bnlint: find BatchNorm problems in PyTorch, ONNX, Keras and Caffe model files.

    \b
    bnlint model.pt                      static checks
    bnlint model.pt --data sample.npz    plus drift / batch checks on your data
    bnlint rules                         the rule table
    bnlint rule BN403                    one rule's documentation
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command("check")
@click.argument("paths", nargs=-1, type=click.Path(), required=False)
@click.option("--format", "--output-format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True, help="Output format.")
@click.option("--select", multiple=True, help="Only these rule codes or prefixes (comma-separated, repeatable).")
@click.option("--ignore", multiple=True, help="Skip these rule codes or prefixes (comma-separated, repeatable).")
@click.option("--fail-on", type=click.Choice(["error", "warning", "info", "never"]), default=None, help="Lowest severity that makes the exit code 1 [default: warning].")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None, help="Write the report to FILE instead of stdout.")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True)
@click.option("--deploy-precision", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Precision the model is deployed in: half-precision hazards (BN107, BN109) are warnings only for float16/bfloat16 [default: float32].")
@click.option("--reference", type=click.Path(), default=None, help="Checkpoint fine-tuning started from (enables BN407).")
@click.option("--data", type=click.Path(), default=None, help="Sample of the data the model now sees (.npz, .npy or a folder of shards): enables BN6xx.")
@click.option("--train-batch-size", type=click.IntRange(min=1), default=None, help="Batch size used in training (else from a Lightning checkpoint).")
@common_options
@click.option("--baseline", type=click.Path(dir_okay=False), default=None, help="Report only findings not in this baseline file.")
@click.option("--skip-unrecognised", is_flag=True, help="Skip files in no model format (e.g. Git LFS pointers) with a note instead of an error (the pre-commit hook uses this).")
@click.option("--write-baseline", is_flag=True, help="Write the current findings to --baseline and exit 0.")
@click.option("--show-fixes", is_flag=True, help="Print each finding's fix under it (by default each code's fix is listed once at the end).")
@click.option("--group/--no-group", default=None,
              help="One line per file and code for findings repeated across layers (--no-group: one line per finding) "
              "[default: information repeated on 4 or more layers of a file shares a line].")
@click.option("--statistics", is_flag=True, help="Print the number of findings per code instead of the findings.")
@click.option("--exit-zero", is_flag=True, help="Exit 0 even when there are findings (unreadable files still exit 2).")
@click.option("--jobs", "-j", type=click.IntRange(min=0), default=1, show_default=True,
              help="Lint files in N worker processes (0: one per CPU).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip paths matching GLOB when searching folders (repeatable; adds to extend-exclude).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write a self-contained HTML report (findings, fixes, drift plots) to FILE.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the drift overview (mean |SMD| and KL per layer) as a PNG to FILE (needs --data and bnlint[plot]).")
def check(**params: Any) -> None:
    """Lint model files (folders are searched for .pt/.pth/.ckpt/.bin/.safetensors/.onnx/.keras/.h5/.caffemodel/.prototxt files)."""
    run_check(CheckOptions.from_click(**params))


def run_check(opts: CheckOptions) -> None:
    """The body of `bnlint check`: lint, print, exit (never returns)."""
    from bnlint.api import lint_paths
    from bnlint.config import load_config
    from bnlint.selection import resolve

    if opts.debug:
        os.environ["BNLINT_DEBUG"] = "1"
    try:
        config = resolve(load_config(opts.config_path).with_overrides(
            select=_split_codes(opts.select), ignore=_split_codes(opts.ignore, "--ignore"),
            fail_on="never" if opts.exit_zero else opts.fail_on, deploy_precision=opts.deploy_precision,
        ))
        opts.validate()
        if opts.exclude:
            config = config.with_overrides(exclude=(*config.exclude, *opts.exclude))
        if opts.write_baseline and not opts.baseline:
            raise BnlintError("--write-baseline needs --baseline FILE")
        _refuse_overwrite({"--output": opts.output, "--report": opts.report_path, "--plot": opts.plot_path,
                           "--baseline": opts.baseline if opts.write_baseline else None},
                          [*opts.paths, opts.reference, opts.data, opts.config_path, None if opts.write_baseline else opts.baseline])
        _side_file("--reference", opts.reference)
        _side_file("--data", opts.data, folder_ok=True)
        dynamic = _dynamic_options(opts) if opts.data else None
        if opts.plot_path:  # fail before a long run, not after it
            if not opts.data:
                raise BnlintError("--plot needs --data (it draws the measured drift)")
            from bnlint.report.plots import require

            require()
        if (opts.plot_path or opts.report_path) and opts.data:
            from bnlint.report.plots import warm_up

            warm_up()  # matplotlib's import and first drawing overlap the isolated run
        if not opts.paths:
            if opts.data:
                raise BnlintError("--data needs a model file to run")
            # Nothing to lint (e.g. a pre-commit hook with no model files staged): clean exit.
            if not opts.quiet:
                click.echo("bnlint: nothing to lint (no paths given)", err=True)
            sys.exit(EXIT_CLEAN)
        readable, refused = _not_regular(opts.paths)
        bar = _FileProgress() if not opts.quiet and sys.stderr.isatty() else None
        try:
            report = lint_paths(readable, config, reference=opts.reference, dynamic=dynamic, skip_unrecognised=opts.skip_unrecognised,
                                baseline=None if opts.write_baseline else opts.baseline, jobs=opts.jobs or (os.cpu_count() or 1),
                                progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        report.files[:0] = refused
        if opts.write_baseline and opts.baseline:
            from bnlint.baseline import write_baseline_file

            count = write_baseline_file(report, opts.baseline)
            click.echo(f"bnlint: wrote {count} findings to {opts.baseline}", err=True)
            sys.exit(EXIT_CLEAN)
    except BnlintError as exc:
        click.echo(f"bnlint: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except (Exception, RecursionError) as exc:  # noqa: BLE001 - a bug outside any one file: one line, exit 2
        if opts.debug:
            raise
        click.echo(f"bnlint: internal error: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]} "
                   "(--debug shows the traceback)", err=True)
        sys.exit(EXIT_ERROR)

    from bnlint.report.text import grouped_run_notes

    for note in grouped_run_notes(report.notes):
        click.echo(f"bnlint: {note}", err=True)
    rules_run = _rules_run(config, dynamic is not None)
    _write(report, rules_run, opts.fmt, opts.output, opts.quiet, opts.color, show_fixes=opts.show_fixes, group=opts.group,
           statistics=opts.statistics)
    try:
        if opts.report_path:
            from bnlint.report.html import write_html

            write_html(report, rules_run, opts.report_path, tool_version=__version__)
        if opts.plot_path:
            from bnlint.report.plots import write_drift_png

            write_drift_png(report, opts.plot_path)
    except BnlintError as exc:
        click.echo(f"bnlint: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(exit_code(report, config.fail_level()))


class _FileProgress:
    """`bnlint: 120/1000 files` on a terminal's stderr, for runs long enough to need it (> 1 s, > 20 files)."""

    def __init__(self) -> None:
        import time

        self.start = time.monotonic()
        self.shown = False

    def update(self, done: int, total: int) -> None:
        import time

        if total < 20 or time.monotonic() - self.start < 1.0:
            return
        sys.stderr.write(f"\rbnlint: {done}/{total} files")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 40 + "\r")
            sys.stderr.flush()


def exit_code(report: Any, fail_level: Any) -> int:
    if report.errors:
        return EXIT_ERROR
    worst = report.worst()
    if fail_level is not None and worst is not None and worst >= fail_level:
        return EXIT_FINDINGS
    return EXIT_CLEAN


def _dynamic_options(opts: CheckOptions) -> Any:
    """What `measure` needs from check's options (only called with --data)."""
    from bnlint.dynamic import DynamicOptions

    return DynamicOptions(
        data=opts.data or "", inputs=opts.input_map(), batch_size=opts.batch_size, train_batch_size=opts.train_batch_size,
        arch=opts.arch, arch_kwargs=opts.factory_kwargs(), trust=opts.trust, device=opts.device, onnx_engine=opts.onnx_engine,
        quiet=opts.quiet or not sys.stderr.isatty(), timeout=opts.timeout,
    )


def _rules_run(config: Any, dynamic: bool) -> dict[str, Any]:
    """The rules that ran: enabled by the config, and the dynamic ones only when data was given."""
    from bnlint.rules import all_rules

    return {code: spec for code, spec in all_rules().items() if config.code_enabled(code) and (dynamic or spec.scope != "dynamic")}


def _color(color: str, tty: bool) -> bool:
    """--color auto: colour only on a terminal that shows it. NO_COLOR (https://no-color.org) and
    TERM=dumb (a terminal without escape sequences: Emacs shells, some CI logs) turn it off."""
    if color != "auto":
        return color == "always"
    return tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM", "") != "dumb"


def _write(report: Any, rules: dict[str, Any], fmt: str, output: str | None, quiet: bool, color: str, **text_options: Any) -> None:
    import io

    from bnlint.report import write_report

    if not output:
        stream = click.get_text_stream("stdout")
        write_report(report, rules, fmt, stream, color=_color(color, stream.isatty()), quiet=quiet, tool_version=__version__, **text_options)
        return
    buffer = io.StringIO()
    write_report(report, rules, fmt, buffer, color=_color(color, False), quiet=quiet, tool_version=__version__, **text_options)
    from bnlint.report._common import write_atomically

    try:  # a temporary file beside it, then one rename: never a half-written report
        write_atomically(output, buffer.getvalue().encode("utf-8", "backslashreplace"))
    except OSError as exc:
        click.echo(f"bnlint: error: cannot write {output}: {exc.strerror or exc}", err=True)
        sys.exit(EXIT_ERROR)


@main.command("fix")
@click.argument("model", type=click.Path())
@click.option("--data", type=click.Path(), default=None, help="Target data (.npz, .npy or a folder of shards): the statistics are re-estimated on it.")
@click.option("--output", "-o", type=click.Path(), default=None,
              help="Write the fixed model to FILE, or to a folder for a folder-format model (a TensorFlow SavedModel); "
                   "the input is never modified.")
@click.option("--in-place", is_flag=True, help="Overwrite the input file (written to a temporary file, then renamed).")
@click.option("--dry-run", is_flag=True, help="Compute and report, write nothing.")
@click.option("--layers", default=None, metavar="GLOB", help="Only layers whose name matches GLOB (comma-separated globs).")
@click.option("--fold", is_flag=True, help="ONNX: fold inference BatchNorm into the Conv/Gemm before it, checked numerically.")
@click.option("--min-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="Refuse to re-estimate statistics from fewer than N samples of --data [default: 32]: a few "
                   "samples give noise, not population statistics.")
@common_options
@click.option("--format", "--output-format", "fmt", type=click.Choice(["text", "json", "sarif"]), default="text", show_default=True, help="Output format.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Also write an HTML report with before/after plots.")
def fix_command(**params: Any) -> None:
    """Repair what the linter finds: exact BatchNorm recalibration on --data (layer by layer, in
    execution order), ONNX training-mode BatchNorm rewritten to inference form, --fold.

    \b
    bnlint fix model.pt --arch models.py:net --data target.npz -o fixed.pt
    bnlint fix model.onnx --data target.npz -o fixed.onnx --fold
    """
    run_fix_command(FixCommandOptions.from_click(**params))


def run_fix_command(opts: FixCommandOptions) -> None:
    """The body of `bnlint fix`: repair, print, exit (never returns)."""
    from bnlint.config import load_config
    from bnlint.dynamic.options import dynamic_settings
    from bnlint.fix.run import distributed_group, run_fix

    if opts.debug:
        os.environ["BNLINT_DEBUG"] = "1"
    try:
        from bnlint.selection import resolve

        config = resolve(load_config(opts.config_path))
        opts.validate()
        settings = dynamic_settings(config)  # flags win over [tool.bnlint.dynamic], as for linting
        _refuse_overwrite({"--report": opts.report_path}, [opts.model, opts.output, opts.data, opts.config_path])
        _side_file("MODEL", opts.model)
        _side_file("--data", opts.data, folder_ok=True)
        check_fix_output(opts.model, opts.output)
        device = _fix_device(opts.device or settings.device, opts.model)
        group = distributed_group(device)  # torchrun: each process reads its shard; rank 0 writes and reports
        if opts.report_path:
            from bnlint.report.plots import warm_up

            warm_up()  # matplotlib's import and first drawing overlap the isolated run
        outcome = run_fix(opts.resolved(settings, device, group), config)
        if group is not None and outcome.output is None and not opts.dry_run:
            sys.exit(EXIT_CLEAN)  # not rank 0: nothing to print
    except BnlintError as exc:  # OutputError included: an unwritable output is one line, exit 2
        click.echo(f"bnlint: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except OSError as exc:  # a writer that let an OSError through (full disk, read-only folder)
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"bnlint: error: cannot write the fixed model: {where}{exc.strerror or exc}", err=True)
        sys.exit(EXIT_ERROR)
    except (Exception, RecursionError) as exc:  # noqa: BLE001 - a bug: one line, exit 2, as for linting
        if opts.debug:
            raise
        click.echo(f"bnlint: internal error: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]} "
                   "(--debug shows the traceback)", err=True)
        sys.exit(EXIT_ERROR)
    from dataclasses import replace

    from bnlint.report.fix import render_fix

    shown = replace(outcome, layers=[], notes=[]) if opts.quiet and opts.fmt == "text" else outcome
    click.echo(render_fix(shown, opts.fmt, tool_version=__version__), nl=False)
    if opts.report_path and outcome.after is not None:
        from bnlint.report.html import FixComparison, write_html
        from bnlint.rules import all_rules

        stats_before = [s for r in outcome.before.files for s in r.layer_stats] if outcome.before else []
        stats_after = [s for r in outcome.after.files for s in r.layer_stats]
        comparison = FixComparison.from_layer_stats(opts.model, stats_before, stats_after, first_drift_before=outcome.first_drift_before,
                                                    first_drift_after=outcome.first_drift_after, output=outcome.output)
        try:
            write_html(outcome.after, all_rules(), opts.report_path, comparison=comparison, tool_version=__version__)
        except BnlintError as exc:
            click.echo(f"bnlint: error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
    remaining = outcome.after.findings if outcome.after is not None else []
    sys.exit(EXIT_FINDINGS if any(f.code in ("BN601", "BN602", "BN606") for f in remaining) else EXIT_CLEAN)


def _fix_device(requested: str, model: str) -> str:
    """`auto` as a device torch accepts, for PyTorch files only (cuda when torch sees a GPU, else cpu).
    ONNX and Keras engines resolve `auto` themselves: onnxruntime picks CUDA only when it has it."""
    if requested != "auto":
        return requested
    import glob

    from bnlint.loaders import detect

    try:
        kind = detect(Path(model)).kind
    except BnlintError:
        return requested  # unreadable: the fix reports it before anything runs
    if kind not in ("torch-zip", "torch-pickle", "safetensors"):
        return requested
    if not glob.glob("/dev/nvidia*"):  # no GPU: no torch import (the sandbox decides the same way)
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"  # the fix then says torch is needed
    return "cuda" if torch.cuda.is_available() else "cpu"


@main.command("rules")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text", show_default=True)
def rules_command(fmt: str) -> None:
    """List every rule: code, name, default severity, summary."""
    import json

    from bnlint.rules import all_rules

    specs = all_rules().values()
    if fmt == "json":
        rows = [{"code": s.code, "name": s.name, "severity": s.severity.label, "family": s.family, "summary": s.summary,
                 "fix": s.fix, "frameworks": list(s.frameworks)} for s in specs]
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "markdown":
        from bnlint.conventions import conventions
        from bnlint.formats import frameworks

        names = frameworks()  # the conventions table's rows: listed once, there
        header = " | ".join(conventions(name).display for name in names)
        click.echo(f"| code | name | severity | {header} | what it finds |\n|---|---|---|{':-:|' * len(names)}---|")
        for s in specs:
            marks = " | ".join("✓" if f in s.frameworks else "" for f in names)
            click.echo(f"| {s.code} | {s.name} | {s.severity.label} | {marks} | {s.summary.replace('|', '&#124;')} |")
    else:
        width = max(len(s.name) for s in specs)
        for s in specs:
            click.echo(f"{s.code}  {s.name:<{width}}  {s.severity.label:<7}  {s.summary}")


@main.command("rule")
@click.argument("code", metavar="CODE_OR_NAME")
def rule_command(code: str) -> None:
    """Show one rule's documentation page: `bnlint rule BN403` or `bnlint rule frozen-bn-in-train-mode`."""
    from bnlint.rules import all_rules, code_for, did_you_mean

    spec = all_rules().get(code_for(code) or "")
    if spec is None:
        click.echo(f"bnlint: error: unknown rule code or name {code!r}{did_you_mean(code)} (see `bnlint rules`)", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(f"# {spec.code} {spec.name} ({spec.severity.label})\n\n{spec.summary}\n\nFix: {spec.fix}\n\n{spec.doc}")


if __name__ == "__main__":  # pragma: no cover
    main()


def entry() -> None:
    """The `bnlint` command (and `python -m bnlint`): `main`, then exit without interpreter teardown.

    Tearing down everything a lint imported (numpy, the rules, torch after --data) took 16 ms of a
    184 ms pre-commit run; bnlint closes every file it writes before `main` returns, so only the
    standard streams need flushing. BNLINT_NORMAL_EXIT=1 exits normally (for coverage tools and
    profilers, whose atexit hooks would otherwise not run).
    """
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if os.environ.get("BNLINT_NORMAL_EXIT"):
        sys.exit(code)
    if isinstance(code, str):  # sys.exit("message") prints the message and exits 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (bnlint ... | head): nothing more to say
            pass
    os._exit(code if isinstance(code, int) else 0)
