"""Plot the curves of one or several run directories into one PNG (``zotune plot RUN [RUN ...]``): training loss on
the left (against steps, forward passes or wall-clock seconds, optionally smoothed with an exponential moving
average) and the dev metric on the right, with each run's test score as a star; every run keeps one colour in both
panels and is labelled by its directory name. Only ``RUN/metrics.jsonl`` is read, so a run can be plotted while it is
still training, and the PNG is written atomically so a viewer refreshing it never sees a half-written file.
matplotlib (the ``plot`` extra) is imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

X_AXES = ("step", "forwards", "seconds")
METRICS = ("accuracy", "f1")  # first one present in an eval line wins; ``em`` is ignored


class MetricsNotFoundError(FileNotFoundError):
    """The directory has no ``metrics.jsonl``: not a zotune run directory (or a run that has not started)."""


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """All records of ``RUN/metrics.jsonl`` in file order, blank lines skipped.

    Args:
        run: a run directory holding ``metrics.jsonl``.

    Returns:
        One dict per non-blank line.

    Raises:
        MetricsNotFoundError: (a ``FileNotFoundError``) there is no ``metrics.jsonl`` in ``run``.
        ValueError: a line is not a JSON object; the message names the file and the 1-based line number.
    """
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise MetricsNotFoundError(f"no metrics.jsonl in {run} (is it a zotune run directory?)")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return records


def ema(values: Sequence[float], smooth: float) -> list[float]:
    """Exponential moving average ``s_t = smooth * s_{t-1} + (1 - smooth) * y_t`` with ``s_0 = y_0``.

    A non-finite value (a diverged step written as NaN) repeats the previous average instead of poisoning the rest.
    """
    out: list[float] = []
    s = math.nan
    for y in values:
        if math.isfinite(y):
            s = y if math.isnan(s) else smooth * s + (1.0 - smooth) * y
        out.append(s)
    return out


@dataclass
class _Series:
    """What one run contributes to the figure, as plain lists (so tests can check it without a PNG)."""

    train_x: list[float] = field(default_factory=list)
    train_y: list[float] = field(default_factory=list)
    train_smooth: list[float] | None = None  # None when smooth == 0
    metric: str | None = None  # "accuracy" or "f1", from the first eval line carrying one
    dev_x: list[float] = field(default_factory=list)
    dev_y: list[float] = field(default_factory=list)
    tests: list[tuple[float, float]] = field(default_factory=list)  # (x, value) of every test line

    @property
    def test(self) -> tuple[float, float] | None:
        """The last test point (the fine-tuned model's; an earlier one at step 0 is the zero-shot baseline)."""
        return self.tests[-1] if self.tests else None


def _float(v) -> float:
    return math.nan if v is None else float(v)


def _series(records: Sequence[dict], x: str = "step", smooth: float = 0.0, where: str = "metrics.jsonl") -> _Series:
    """Extract the train-loss curve, dev curve and test point of one run's records against ``x``.

    ``where`` names the run in error messages. With ``x="forwards"`` every train line needs ``forwards``; an eval
    line without it takes the count of the latest train line at or before its step (the forwards spent so far).
    With ``x="seconds"`` the axis is the wall-clock the run has spent, in file order: every train line's
    ``step_time`` and every evaluation's ``seconds`` (an evaluation is drawn where it starts; a resumed run's lines
    continue the sum).
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    s = _Series()
    seen: list[tuple[float, float]] = []  # (step, forwards) of the train lines, for eval lines lacking forwards
    clock = 0.0  # x="seconds": the wall-clock spent before this line
    for rec in records:
        kind = rec.get("kind")
        if kind == "train":
            if "step" not in rec or "loss" not in rec:
                raise ValueError(f"{where}: train line without 'step' or 'loss': {json.dumps(rec)[:200]}")
            if x == "seconds":
                if rec.get("step_time") is None:
                    raise ValueError(
                        f"{where}: train line at step {rec['step']} has no 'step_time' field; plot with x='step'"
                    )
                clock += float(rec["step_time"])
                s.train_x.append(clock)
                s.train_y.append(_float(rec["loss"]))
                continue
            if x == "forwards":
                if rec.get("forwards") is None:
                    raise ValueError(
                        f"{where}: train line at step {rec['step']} has no 'forwards' field; plot with x='step'"
                    )
                seen.append((float(rec["step"]), float(rec["forwards"])))
            s.train_x.append(float(rec[x]))
            s.train_y.append(_float(rec["loss"]))
        elif kind == "eval":
            name = next((m for m in METRICS if rec.get(m) is not None), None)
            split = rec.get("split", "dev")
            if name is None or split not in ("dev", "test") or "step" not in rec:
                continue
            if x == "seconds":
                at = clock
                clock += float(rec.get("seconds") or 0.0)
            elif x == "step" or rec.get("forwards") is not None:
                at = float(rec[x])
            else:
                earlier = [f for st, f in seen if st <= rec["step"]]
                if not earlier:
                    raise ValueError(
                        f"{where}: eval line at step {rec['step']} has no 'forwards' field; plot with x='step'"
                    )
                at = earlier[-1]
            s.metric = s.metric or name
            if split == "dev":
                s.dev_x.append(at)
                s.dev_y.append(float(rec[name]))
            else:
                s.tests.append((at, float(rec[name])))
    if smooth > 0:
        s.train_smooth = ema(s.train_y, smooth)
    return s


def _labels(runs: Sequence[Path]) -> list[str]:
    """Directory names, lengthened by parent folders only where two runs would share a label."""
    parts = [p.resolve().parts for p in runs]
    depth = [1] * len(runs)
    while True:
        labels = [PurePath(*ps[-d:]).as_posix() for ps, d in zip(parts, depth, strict=True)]
        # Lengthen only labels shared by *different* directories; the same directory twice is numbered below.
        clash = {i for i, a in enumerate(labels) for j, b in enumerate(labels) if a == b and parts[i] != parts[j]}
        if not clash:
            break
        for i in clash:
            depth[i] = min(depth[i] + 1, len(parts[i]))
    for i, lab in enumerate(labels):
        n = labels[:i].count(lab)
        if n:
            labels[i] = f"{lab} ({n + 1})"
    return labels


def _colours(n: int) -> list:
    """One distinct colour per run: the default cycle up to 10 runs, tab20 up to 20, then a sampled colormap."""
    from matplotlib import colormaps

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


def plot_runs(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    x: str = "step",
    smooth: float = 0.0,
    title: str | None = None,
) -> Path:
    """Draw the training loss and dev metric of ``runs`` into one PNG.

    Args:
        runs: run directories, each holding a ``metrics.jsonl``.
        out: the PNG to write; defaults to ``RUN/plot.png`` for a single run and is required for several.
        x: the horizontal axis, ``"step"``, ``"forwards"`` (forward passes spent, the ZO cost measure) or
            ``"seconds"`` (wall-clock of the steps and evaluations).
        smooth: exponential-moving-average weight in ``[0, 1)`` for the loss; 0 draws the raw curve only, otherwise
            the raw curve is drawn faint under the smoothed one.
        title: a figure title.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: no runs, several runs without ``out``, a bad ``x`` or ``smooth``, or an unreadable metrics file.
        MetricsNotFoundError: a run has no ``metrics.jsonl``.

    Example:
        >>> import json, os, shutil, tempfile
        >>> run = tempfile.mkdtemp()
        >>> with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        ...     for step, loss in [(1, 0.7), (2, 0.6), (3, 0.5)]:
        ...         print(json.dumps({"kind": "train", "step": step, "loss": loss}), file=f)
        ...     print(json.dumps({"kind": "eval", "step": 3, "split": "dev", "accuracy": 0.8}), file=f)
        >>> [r["kind"] for r in read_metrics(run)]
        ['train', 'train', 'train', 'eval']
        >>> png = plot_runs([run], smooth=0.5)
        >>> png.name, png.read_bytes()[:4]
        ('plot.png', b'\\x89PNG')
        >>> shutil.rmtree(run)
    """
    if not runs:
        raise ValueError("no run directories given")
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    paths = [Path(r) for r in runs]
    if out is None:
        if len(paths) > 1:
            raise ValueError("several runs need an output file (--out PNG)")
        out = paths[0] / "plot.png"
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"output {out} is a directory; give a file name such as {out / 'plot.png'}")
    # Read everything before touching matplotlib or the output, so bad input fails fast and writes nothing.
    series = [_series(read_metrics(p), x, smooth, where=str(p / "metrics.jsonl")) for p in paths]

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise ImportError("zotune plot needs matplotlib: pip install 'zotune[plot]'") from e

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly, no pyplot global state: safe in threads and headless jobs
    ax_loss, ax_eval = fig.subplots(1, 2)
    colours = _colours(len(series))
    labels = _labels(paths)

    for s, c in zip(series, colours, strict=True):
        if not s.train_x:
            pass  # an eval-only run: nothing in the loss panel (empty lines would distort its axes)
        elif s.train_smooth is None:
            ax_loss.plot(s.train_x, s.train_y, color=c, lw=1.2)
        else:
            ax_loss.plot(s.train_x, s.train_y, color=c, lw=0.8, alpha=0.25)
            ax_loss.plot(s.train_x, s.train_smooth, color=c, lw=1.6)
        if s.dev_x:
            ax_eval.plot(s.dev_x, s.dev_y, color=c, marker="o", ms=4, lw=1.2)
        for tx, ty in s.tests:  # zero-shot (step 0) and fine-tuned test scores, each labelled with its value
            ax_eval.plot(tx, ty, color=c, marker="*", ms=14, ls="none", mec="black", mew=0.6)
            ax_eval.annotate(f"{ty:.3f}", (tx, ty), textcoords="offset points", xytext=(8, -3), fontsize="small")

    ax_loss.set_xlabel(x)
    ax_loss.set_ylabel("training loss" + (f" (EMA {smooth:g})" if smooth > 0 else ""))
    ax_loss.set_title("training loss")
    if not any(s.train_x for s in series):
        ax_loss.text(0.5, 0.5, "no training lines", ha="center", va="center", transform=ax_loss.transAxes)
    # Proxy handles so eval-only runs still appear, once each, in the legend.
    handles = [Line2D([], [], color=c, lw=1.6, label=lab) for c, lab in zip(colours, labels, strict=True)]
    ax_loss.legend(handles=handles, fontsize="small")

    metrics = sorted({s.metric for s in series if s.metric})
    if metrics:
        ax_eval.set_ylabel("dev " + " / ".join(metrics))
        ax_eval.set_title("dev " + " / ".join(metrics))
        if any(s.test for s in series):
            star = Line2D([], [], color="grey", marker="*", ms=12, ls="none", mec="black", mew=0.6, label="test")
            ax_eval.legend(handles=[star], fontsize="small")
    else:
        ax_eval.set_title("evaluation")
        ax_eval.text(0.5, 0.5, "no evaluations", ha="center", va="center", transform=ax_eval.transAxes)
    ax_eval.set_xlabel(x)
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)

    return save_png(fig, out)


def save_png(fig: Any, out: Path, dpi: int = 110) -> Path:
    """Write the matplotlib figure ``fig`` to ``out`` as a PNG, atomically: a reader sees the old file or the new one,
    never half of one. Returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Save under a hidden temporary name in the same folder, then rename: os.replace is atomic within a file system.
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}.png"
    try:
        with open(tmp, "xb") as f:  # "x" (not mkstemp) so the PNG gets the usual umask permissions
            fig.savefig(f, format="png", dpi=dpi)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """``zotune plot RUN [RUN ...] [--out PNG] [--x step|forwards|seconds] [--smooth 0.9] [--title T]``: the exit
    code."""
    p = argparse.ArgumentParser(
        prog="zotune plot",
        description="Plot training loss and dev metric of one or several run directories into one PNG.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="PNG", help="output file (default RUN/plot.png for one run)")
    p.add_argument("--x", default="step", help="horizontal axis: step, forwards or seconds (default step)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for the loss (default 0: raw)")
    p.add_argument("--title", default=None, help="figure title")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # usage errors (printed by argparse) and --help: return the code instead of exiting
        return e.code if isinstance(e.code, int) else 2
    try:
        out = plot_runs(a.runs, a.out, x=a.x, smooth=a.smooth, title=a.title)
    except (ValueError, OSError, ImportError) as e:
        print(f"zotune plot: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
