"""Drift plots rendered to PNG bytes; matplotlib is optional (`pip install 'bnlint[plot]'`).

Pure rendering, like every reporter: each function takes `FileResult.layer_stats` records (the
dicts of `bnlint.dynamic.metrics.layer_record`) and draws numbers that are already there; no
statistic is computed here. Figures:

- `layer_png`: one BatchNorm layer, per-channel SMD (mean shift in stored standard deviations)
  and LVR (log variance ratio) as two bar panels over the channels, +-1 standard error whiskers.
- `overview_png`: every layer in execution order, mean |SMD| and mean KL (with the sample's
  noise floor), the first drifting layer (BN602) marked.
- `comparison_layer_png`, `comparison_overview_png`: the same, before and after a fix.

matplotlib is imported lazily, and through its object API on an explicit Agg canvas (never
pyplot: no global figure state, no GUI backend picked from the environment). Output is
byte-for-byte deterministic: fixed figure sizes and DPI, matplotlib's bundled DejaVu font, and
PNG metadata without the "Software" (version) entry; Agg writes no timestamp.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import re
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from bnlint.errors import UsageError
from bnlint.findings import Finding, Report

if TYPE_CHECKING:  # matplotlib is an optional dependency: imported only when drawing
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'bnlint[plot]'"
DPI = 100
LAYER_SIZE = (6.4, 3.6)  # inches: 640 x 360 px, two per row in a 1280 px page
OVERVIEW_SIZE = (10.0, 5.0)  # 1000 x 500 px per file
COMPARISON_LAYER_SIZE = (10.0, 4.4)
# Whiskers and per-bar detail stop being readable beyond this many channels.
MAX_WHISKER_CHANNELS = 64
MAX_GAP_CHANNELS = 128  # wider layers get gapless bars
MAX_NAMED_TICKS = 40
LABEL_CHARS = 32

_BLUE, _ORANGE, _GREY, _RED, _LIGHT = "#1f77b4", "#d8781c", "#9aa3ad", "#c62828", "#b9cfe4"
_LAYER_MARGINS = {"left": 78.0, "right": 10.0, "top": 26.0, "bottom": 44.0}
_RC = {
    "text.parse_math": False,  # a "$" in a layer name must not switch to mathtext
    "text.usetex": False,
    "font.family": "DejaVu Sans",
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8.0,
    "legend.frameon": False,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
}

# Characters shown escaped wherever a name from a model file is displayed: C0/C1 controls,
# bidirectional overrides and isolates, zero-width characters, line separators, lone surrogates.
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")


class PlotUnavailable(UsageError):
    """matplotlib is not installed (plots are the `plot` extra)."""

    def __init__(self) -> None:
        super().__init__(f"plots need matplotlib, which is not installed: {INSTALL_HINT}")


def visible(text: str) -> str:
    """`text` with control, bidi and invisible characters replaced by their escapes (\\x1b, \\u202e)."""
    return _HIDDEN.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def available() -> bool:
    try:
        require()
    except PlotUnavailable:
        return False
    return True


def require() -> None:
    """Raise PlotUnavailable now (e.g. before a long lint for `--plot`) when matplotlib is missing."""
    _matplotlib()


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable() from None
    return matplotlib


_warming: threading.Thread | None = None


def warm_up() -> None:
    """Import matplotlib and draw one tiny figure in a background thread.

    The CLI calls this before a `--report`/`--plot` run: the import and the first drawing (fonts,
    the Agg canvas) then overlap the model's run in its isolated child instead of following it.
    Drawing waits for the warm-up (`_render`), so matplotlib is never used from two threads.
    """
    global _warming
    import importlib.util

    if _warming is None and importlib.util.find_spec("matplotlib") is not None:
        _warming = threading.Thread(target=_draw_tiny, name="bnlint-plot-warm-up", daemon=True)
        _warming.start()


def render_all(renders: Sequence[Callable[[], bytes]]) -> list[bytes]:
    """Every figure of a page as PNG bytes, in order: in two forked worker processes when there are
    at least three figures, two cores and no other thread in this process (each figure is drawn
    alone, under the same rc settings, so the bytes are the ones a single process draws), else here."""
    if _warming is not None:
        _warming.join()  # never fork while the warm-up thread holds matplotlib's locks
    if len(renders) < 3 or _cores() < 2 or "fork" not in multiprocessing.get_all_start_methods() or not _single_threaded():
        return [render() for render in renders]
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_call, renders))
    except (BrokenProcessPool, OSError):  # no processes to be had here: draw them one by one
        return [render() for render in renders]


def _single_threaded() -> bool:
    """Whether this process runs no other Python thread: forking copies only the calling thread,
    so a lock another thread holds at that moment stays locked in the child for ever (seen: a
    report drawn inside a pytest-xdist worker, whose IO threads were alive, hung both forked
    children). Native pools (OpenBLAS) hold no Python lock and reset themselves at fork."""
    return threading.active_count() == 1


def _call(render: Callable[[], bytes]) -> bytes:
    return render()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _draw_tiny() -> None:
    try:
        _render_now(_tiny_figure)
    except Exception:  # noqa: BLE001 - a failed warm-up only means the real drawing pays the cost
        pass


def _tiny_figure() -> Figure:
    fig = _figure((1.0, 0.5), {"left": 20.0, "right": 2.0, "top": 2.0, "bottom": 12.0})
    ax = fig.add_subplot()
    ax.bar([0, 1], [1.0, 2.0])
    ax.set_title("warm-up")
    return fig


def first_drift_layer(findings: Iterable[Finding]) -> str | None:
    """The layer BN602 names (the first drifting layer in execution order), if any."""
    return next((f.layer for f in findings if f.code == "BN602"), None)


def drifting_layers(findings: Iterable[Finding]) -> frozenset[str]:
    """Layers with a BN601 (distribution drift) finding."""
    return frozenset(f.layer for f in findings if f.code == "BN601" and f.layer is not None)


def in_execution_order(layer_stats: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records sorted by their `order` key; records without one keep their place at the end."""
    def key(item: tuple[int, Mapping[str, Any]]) -> tuple[int, int]:
        order = item[1].get("order")
        return (order, item[0]) if isinstance(order, int) and not isinstance(order, bool) else (1 << 62, item[0])

    return [record for _, record in sorted(enumerate(layer_stats), key=key)]


def number(value: Any) -> float:
    """A plottable float: None, booleans and non-numbers become NaN (matplotlib leaves them out)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def short_label(name: Any, width: int = LABEL_CHARS) -> str:
    text = visible(str(name))
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "\u2026" + text[len(text) - (width - 1 - head):]


def _channel(stats: Mapping[str, Any], key: str) -> list[float]:
    channel = stats.get("channel")
    values = channel.get(key) if isinstance(channel, Mapping) else None
    return [number(v) for v in values] if isinstance(values, (list, tuple)) else []


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _figure(size: tuple[float, float], margins: Mapping[str, float] | None = None) -> Figure:
    """A figure with fixed `margins` in pixels (left, right, top, bottom), else constrained layout.

    Per-layer figures, drawn by the dozen, use fixed margins: constrained layout costs a third
    of their drawing time and their labels do not vary in size.
    """
    from matplotlib.figure import Figure

    if margins is None:
        return Figure(figsize=size, dpi=DPI, layout="constrained")
    fig = Figure(figsize=size, dpi=DPI)
    width, height = size[0] * DPI, size[1] * DPI
    fig.subplots_adjust(left=margins["left"] / width, right=1 - margins["right"] / width, top=1 - margins["top"] / height,
                        bottom=margins["bottom"] / height, hspace=0.12, wspace=0.12)
    return fig


def _render(draw: Any, *args: Any) -> bytes:
    """Run `draw(*args) -> Figure` under bnlint's rc settings and return the PNG bytes."""
    if _warming is not None and _warming is not threading.current_thread():
        _warming.join()
    return _render_now(draw, *args)


def _render_now(draw: Any, *args: Any) -> bytes:
    matplotlib = _matplotlib()
    with matplotlib.rc_context(_RC), warnings.catch_warnings():
        # A layer name in a script DejaVu lacks draws boxes; the HTML shows the real name.
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font")
        return _png(draw(*args))


def _channel_panel(ax: Axes, values: list[float], errors: list[float], ylabel: str, limit: float | None = None) -> None:
    count = len(values)
    xs = list(range(count))
    whiskers = count <= MAX_WHISKER_CHANNELS and len(errors) == count
    finite = [0.0 if math.isnan(v) else v for v in values]
    _bars(ax, finite, 0.8 if count <= MAX_GAP_CHANNELS else 1.0)
    if whiskers:
        spans = [(x, v, 0.0 if math.isnan(e) else e) for x, v, e in zip(xs, finite, errors)]
        ax.vlines([x for x, _, _ in spans], [v - e for _, v, e in spans], [v + e for _, v, e in spans], color="#333333", linewidth=0.8)
    missing = [x for x, v in zip(xs, values) if math.isnan(v)]
    if missing:  # explained in the title: a legend box would cover bars
        ax.plot(missing, [0.0] * len(missing), linestyle="none", marker="x", color=_RED)
    ax.axhline(0.0, color="#444444", linewidth=0.6)
    if limit is None:
        limit = _symmetric_limit(values, errors if whiskers else [])
    ax.set_ylim(-limit, limit)
    ax.set_xlim(-0.7, max(count, 1) - 0.3)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="#e3e6ea", linewidth=0.6)
    ax.set_axisbelow(True)


def _integer_ticks(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _bars(ax: Axes, heights: Sequence[float], width: float) -> None:
    """Bars coloured by sign as one polygon collection (ax.bar adds a patch per bar: slow for wide layers)."""
    from matplotlib.collections import PolyCollection

    half = width / 2
    boxes = [((x - half, 0.0), (x - half, h), (x + half, h), (x + half, 0.0)) for x, h in enumerate(heights)]
    ax.add_collection(PolyCollection(boxes, facecolors=[_ORANGE if h < 0 else _BLUE for h in heights], linewidths=0))


def _symmetric_limit(values: Sequence[float], errors: Sequence[float]) -> float:
    spans = [abs(v) + (0.0 if i >= len(errors) or math.isnan(errors[i]) else errors[i]) for i, v in enumerate(values) if not math.isnan(v)]
    return max([0.1, *spans]) * 1.15


def _draw_layer(stats: Mapping[str, Any]) -> Figure:
    fig = _figure(LAYER_SIZE, _LAYER_MARGINS)
    top, bottom = fig.subplots(2, 1, sharex=True)
    _channel_panel(top, _channel(stats, "smd"), _channel(stats, "se_smd"), "SMD (mean shift, σ)")
    _channel_panel(bottom, _channel(stats, "lvr"), _channel(stats, "se_lvr"), "LVR (log var ratio)")
    bottom.set_xlabel("channel")
    _integer_ticks(bottom)
    smd = _channel(stats, "smd")
    missing = sum(1 for v in [*smd, *_channel(stats, "lvr")] if math.isnan(v))
    note = ", \u00d7 = non-finite" if missing else ""
    top.set_title(f"{short_label(stats.get('layer', '?'), 56)}  ({len(smd)} channels{note})", loc="left")
    return fig


def layer_png(stats: Mapping[str, Any]) -> bytes:
    """Per-channel SMD and LVR of one layer record, as a PNG (640 x 360 px)."""
    return _render(_draw_layer, stats)


def _layer_ticks(ax: Axes, names: Sequence[Any]) -> None:
    count = len(names)
    if count <= MAX_NAMED_TICKS:
        ax.set_xticks(range(count), [short_label(n) for n in names], rotation=45 if count > 6 else 0, ha="right" if count > 6 else "center")
    else:  # too many names to read: number the layers (the HTML table lists them in the same order)
        _integer_ticks(ax)
        ax.set_xlabel("layer (execution order)")
    ax.set_xlim(-0.7, max(count, 1) - 0.3)


def _mark_first(axes: Sequence[Axes], names: Sequence[Any], first: str | None, color: str, label: str) -> None:
    """Shade the first drifting layer's column in every panel (labelled once, for the legend)."""
    if first is None or first not in names:
        return
    x = list(names).index(first)
    for i, ax in enumerate(axes):
        ax.axvspan(x - 0.5, x + 0.5, color=color, alpha=0.14, linewidth=0, zorder=0, label=label if i == 0 else None)


def _legend_above(ax: Axes, handles: Sequence[Any] | None = None) -> None:
    found, _ = ax.get_legend_handles_labels()
    shown = [*(handles or []), *found]
    if shown:
        ax.legend(handles=shown, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(shown), borderaxespad=0.2)


def _draw_overview(axes: Sequence[Axes], stats: Sequence[Mapping[str, Any]], first: str | None, drifting: frozenset[str], title: str) -> None:
    top, bottom = axes
    names = [s.get("layer", "?") for s in stats]
    xs = range(len(stats))
    colors = [_BLUE if n in drifting else _LIGHT for n in names]
    top.bar(xs, [number(s.get("mean_abs_smd")) for s in stats], color=colors, width=0.75, linewidth=0)
    bottom.bar(xs, [number(s.get("mean_kl")) for s in stats], color=colors, width=0.75, linewidth=0)
    noise = [number(s.get("noise_kl")) for s in stats]
    if any(not math.isnan(v) for v in noise):
        bottom.plot(xs, noise, linestyle="none", marker="_", markersize=14, markeredgewidth=2, color="#333333", label="noise floor (KL)")
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=label) for color, label in ((_BLUE, "drifting (BN601)"), (_LIGHT, "no drift found"))
               if color in colors]
    _mark_first([top, bottom], names, first, _RED, f"drift begins: {short_label(first or '')}")
    top.set_ylabel("mean |SMD|")
    bottom.set_ylabel("mean KL")
    top.set_title(title, loc="left")
    for ax in (top, bottom):
        ax.grid(axis="y", color="#e3e6ea", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_ylim(bottom=0.0)
    top.tick_params(labelbottom=False)
    _layer_ticks(bottom, names)
    _legend_above(top, [*handles, *bottom.get_legend_handles_labels()[0]])


def _overview_figure(panels: Sequence[tuple[str, Sequence[Mapping[str, Any]], str | None, frozenset[str]]]) -> Figure:
    width, height = OVERVIEW_SIZE
    fig = _figure((width, height * len(panels)))
    axes = list(fig.subplots(2 * len(panels), 1, squeeze=False)[:, 0])
    for i, (title, stats, first, drifting) in enumerate(panels):
        axes[2 * i].sharex(axes[2 * i + 1])
        _draw_overview(axes[2 * i: 2 * i + 2], in_execution_order(stats), first, drifting, title)
    return fig


def overview_png(layer_stats: Sequence[Mapping[str, Any]], *, first_drift: str | None = None,
                 drifting: frozenset[str] = frozenset(), title: str = "drift by layer") -> bytes:
    """Mean |SMD| and mean KL per layer in execution order (1000 x 500 px)."""
    return _render(_overview_figure, [(title, layer_stats, first_drift, drifting)])


def write_drift_png(report: Report, path: str | os.PathLike[str]) -> None:
    """`--plot FILE`: the overview of every file with layer statistics, one 1000 x 500 px band each."""
    panels = [
        (f"{short_label(r.path, 80)}: drift by layer", r.layer_stats, first_drift_layer(r.findings), drifting_layers(r.findings))
        for r in report.files
        if r.layer_stats
    ]
    if not panels:
        raise UsageError("--plot needs layer statistics: run with --data")
    data = _render(_overview_figure, panels)
    from bnlint.report._common import write_atomically

    try:
        write_atomically(path, data)
    except OSError as exc:
        raise UsageError(f"cannot write {os.fspath(path)}: {exc.strerror}") from None


def _draw_comparison_layer(before: Mapping[str, Any], after: Mapping[str, Any]) -> Figure:
    fig = _figure(COMPARISON_LAYER_SIZE, _LAYER_MARGINS)
    axes = fig.subplots(2, 2, sharex=True)
    for row, (key, se, label) in enumerate((("smd", "se_smd", "SMD (mean shift, σ)"), ("lvr", "se_lvr", "LVR (log var ratio)"))):
        limit = max(_symmetric_limit(_channel(s, key), _channel(s, se)) for s in (before, after))
        for col, stats in enumerate((before, after)):
            _channel_panel(axes[row][col], _channel(stats, key), _channel(stats, se), label if col == 0 else "", limit)
    name = short_label(before.get("layer", after.get("layer", "?")), 56)
    axes[0][0].set_title(f"{name}: before (old stored statistics)", loc="left")
    axes[0][1].set_title("after (new stored statistics)", loc="left")
    if any(math.isnan(v) for s in (before, after) for key in ("smd", "lvr") for v in _channel(s, key)):
        axes[0][1].set_title("\u00d7 = non-finite", loc="right")
    for col in (0, 1):
        axes[1][col].set_xlabel("channel")
        _integer_ticks(axes[1][col])
    return fig


def comparison_layer_png(before: Mapping[str, Any], after: Mapping[str, Any]) -> bytes:
    """One layer's SMD and LVR against the old (left) and the new (right) stored statistics, same y scales."""
    return _render(_draw_comparison_layer, before, after)


def _draw_comparison_overview(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], names: Sequence[str],
                              first_before: str | None, first_after: str | None) -> Figure:
    fig = _figure(OVERVIEW_SIZE)
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = list(range(len(pairs)))
    for ax, key, label in ((top, "mean_abs_smd", "mean |SMD|"), (bottom, "mean_kl", "mean KL")):
        ax.bar([x - 0.2 for x in xs], [number(b.get(key)) for b, _ in pairs], width=0.4, color=_GREY, linewidth=0, label="before")
        ax.bar([x + 0.2 for x in xs], [number(a.get(key)) for _, a in pairs], width=0.4, color=_BLUE, linewidth=0, label="after")
        ax.set_ylabel(label)
        ax.grid(axis="y", color="#e3e6ea", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_ylim(bottom=0.0)
    _mark_first([top, bottom], names, first_before, _GREY, f"drift begins before: {short_label(first_before or '')}")
    _mark_first([top, bottom], names, first_after, _RED, f"drift begins after: {short_label(first_after or '')}")
    top.set_title("before / after the fix, by layer", loc="left")
    _legend_above(top)
    _layer_ticks(bottom, names)
    return fig


def comparison_overview_png(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], names: Sequence[str], *,
                            first_before: str | None = None, first_after: str | None = None) -> bytes:
    """Mean |SMD| and mean KL per layer, before (grey) and after (blue) the fix (1000 x 500 px)."""
    return _render(_draw_comparison_overview, pairs, names, first_before, first_after)
