"""The results page: committed table rows and benchmark JSONs → one markdown page with its plots.

Reads only committed files, so the page is regenerated without any run directory:

* accuracy rows (``runs.jsonl`` of :mod:`zotune.bench.accuracy`; each row keeps its dev and loss curves against
  forward passes): per task, each method's dev-selected test accuracy, the forwards it spent and the forwards it
  needed to first reach a dev accuracy of zero-shot + ``--gain``;
* speed/memory JSONs of :mod:`zotune.bench` (step ÷ 2 forwards, peak ÷ inference);
* plots per task: dev accuracy and training loss against forward passes (matplotlib, the ``plot`` extra);
* with ``--claims FOLDER``: the claims grid's section (:mod:`zotune.bench.claims`: per claim the mean ± std over
  seeds, the forwards and seconds to reach MeZO's peak dev, and a verdict by a stated rule).

Example (the committed page comes from this command)::

    python -m zotune.bench.report benchmarks/results/suite-smollm2 \\
        --speed benchmarks/results/cpu-smollm2-b16x64.json benchmarks/results/cpu-smollm2-b16x64-methods.json \\
        --out docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.log import atomic_write_text
from ..train.plot import ema, save_png
from .accuracy import LABELS, row_order


def load_rows(folders: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The rows of every ``FOLDER/runs.jsonl``, each tagged with the file it came from (a row's run name is unique
    within a folder; a later folder's row for the same task and run name replaces an earlier one)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for folder in folders:
        path = Path(folder) / "runs.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no runs.jsonl in {folder} (made by python -m zotune.bench.accuracy)")
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                row["source"] = str(path)
                rows[(row["task"], row["run"])] = row
    return sorted(rows.values(), key=row_order)


def label(row: dict[str, Any]) -> str:
    if row.get("sparse"):
        sp = row["sparse"]
        return f"sparse {sp['sparsity']:.1%} {sp['mask']} ({sp['quantize']})"
    return LABELS.get((row["method"], row["peft"]), f"{row['method']} ({row['peft']})")


def labels(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Each row's label by run name; rows of one task that share a label (an lr scan) get their lr appended."""
    names = {r["run"]: label(r) for r in rows}
    shared = {name for name, n in Counter(names.values()).items() if n > 1}
    return {r["run"]: f"{name}, lr {_lr(r)}" if (name := names[r["run"]]) in shared else name for r in rows}


def forwards_to_reach(row: dict[str, Any], target: float) -> int | None:
    """Forward passes at the first dev evaluation at or above ``target`` (None: not reached, or no curve)."""
    for forwards, acc in row.get("curves", {}).get("dev", []):
        if acc is not None and acc >= target:
            return forwards
    return None


def _link(path: str, base: Path) -> str:
    return os.path.relpath(path, base)


def load_baselines(files: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Zero-shot, calibrated and ICL results: lines of :mod:`zotune.bench.zeroshot`, or ``zotune eval --out`` files;
    each tagged with its file."""
    out = []
    for f in files:
        text = Path(f).read_text()
        try:  # a `zotune eval --out` file: one JSON object
            items = [json.loads(text)]
        except json.JSONDecodeError:  # a zotune.bench.zeroshot file: JSON lines
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        out += [item | {"source": str(f)} for item in items]
    return out


def accuracy_section(
    rows: Sequence[dict[str, Any]], gain: float, base: Path, baselines: Sequence[dict[str, Any]] = ()
) -> list[str]:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        part = [r for r in rows if r["task"] == task]
        ref = next((r for r in part if r["peft"] in ("none", "lora", "head") and r.get("zero_shot_test")), part[0])
        target = ref["zero_shot_dev"] + gain
        out += [
            f"### {task} (test n = {ref['test_n']}; zero-shot test {ref.get('zero_shot_test') or 0:.3f}, "
            f"dev {ref['zero_shot_dev']:.3f})",
            "",
            f"| method | test | best dev (step) | forwards (budget) | backwards | forwards to dev ≥ {target:.3f} | "
            "trained params | lr | peak MiB | row |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        if ref.get("zero_shot_test") is not None:  # every run's step 0, evaluated on the same dev and test sets
            out.append(
                f"| zero-shot | {ref['zero_shot_test']:.3f} | {ref['zero_shot_dev']:.3f} (0) | 0 | 0 | 0 | 0 | — | "
                f"— | step 0 of [{ref['run']}]({_link(ref['source'], base)}) |"
            )
        # zero-shot variants and in-context learning, where they were measured on this very test set (same n)
        for b in baselines:
            if b["task"] == task and b["n"] == ref["test_n"] and b["setting"] != "zero-shot":
                src = f"[{Path(b['source']).name}]({_link(b['source'], base)})"
                out.append(f"| {b['setting']} | {b['accuracy']:.3f} | — | 0 | 0 | — | 0 | — | — | {src} |")
        names = labels(part)
        for r in part:
            reach = forwards_to_reach(r, target)
            reach_s = "—" if "curves" not in r else (str(reach) if reach is not None else "not reached")
            peak = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") else "—"
            out.append(
                f"| {names[r['run']]} | {r['test']:.3f} | {r['best_dev']:.3f} ({r['best_step']}) | {r['forwards']} "
                f"({r['budget']}) | {r['backwards']} | {reach_s} | {r['trainable_parameters']:,} | {_lr(r)} | "
                f"{peak} | [{r['run']}]({_link(r['source'], base)}){_config_link(r, base)} |"
            )
        out.append("")
    return out


def _config_link(row: dict[str, Any], base: Path) -> str:
    """A link to the row's full config (``configs/RUN.yaml`` beside its runs.jsonl), when it was kept."""
    cfg = Path(row["source"]).parent / "configs" / f"{row['run']}.yaml"
    return f" · [config]({_link(str(cfg), base)})" if cfg.is_file() else ""


def _lr(row: dict[str, Any]) -> str:
    """The row's learning rate(s): ZOFO has three (the base's ZO step, the lower and the upper adapters')."""
    h = row.get("hparams", {})
    if "lr_lower" in h:
        return f"{h['lr']:g} / {h['lr_lower']:g} / {h['lr_upper']:g}"
    return f"{h['lr']:g}" if "lr" in h else "—"


def sources_section(folders: Sequence[str | Path], base: Path) -> list[str]:
    """Where the rows come from: each folder's command (``command.txt``, written by the script that made it)."""
    out = ["Rows come from these folders (one JSON line per run: config, budget, curves):", ""]
    for folder in folders:
        folder = Path(folder)
        cmd_file = folder / "command.txt"
        cmd = cmd_file.read_text().strip() if cmd_file.exists() else "(no command.txt)"
        out.append(f"- [{folder.name}]({_link(str(folder / 'runs.jsonl'), base)}): `{cmd}`")
    return out + [""]


# ratio-key stems of the speed/memory JSONs → the method they measure
SPEED_LABELS = {
    "mezo_gaussian": "MeZO (Gaussian z)",
    "mezo_rademacher": "MeZO (Rademacher z)",
    "reference": "MeZO, the reference code's loop",
    "adamw": "FO full (AdamW)",
    "fo_full": "FO full (AdamW)",
    "lozo": "LOZO",
    "lozo_inplace": "LOZO (in-place variant)",
    "lozo_m": "LOZO-M",
    "svrg": "MeZO-SVRG",
    "sparse_zo": "SensZOQ: sparse 0.1 % over NF4",
    "mezo_lora": "MeZO-LoRA",
    "fo_lora": "FO-LoRA (AdamW)",
    "zofo": "Bilevel ZOFO",
    "zofo_no_release": "Bilevel ZOFO without the heap trim",
}
_STEP = re.compile(r"^(?:(.+)_)?step_over_(\d+)fwd$")  # a bare `step_over_2fwd` is the sparse benchmark's
_PEAK = re.compile(r"^peak_(.+)_over_(fp32_)?inference$")  # fp32_: the sparse benchmark's base is NF4


def speed_rows(res: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Split one benchmark JSON's ratios into per-method {step, forwards, peak} and the other ratios."""
    methods: dict[str, dict[str, Any]] = {}
    other = {}
    for key, value in sorted(res.get("ratios", {}).items()):
        if (m := _STEP.match(key)) and (m.group(1) or "sparse_zo") in SPEED_LABELS:
            methods.setdefault(m.group(1) or "sparse_zo", {}).update(step=value, forwards=int(m.group(2)))
        elif (m := _PEAK.match(key)) and m.group(1) in SPEED_LABELS:
            methods.setdefault(m.group(1), {}).update(peak=value, fp32=bool(m.group(2)))
        else:
            other[key] = value
    return methods, other


def _spread(res: dict[str, Any], name: str, m: dict[str, Any]) -> str:
    """The range of the per-round ratios behind a median (the JSON's interleaved ``rounds``), when it has them: how
    much a timing ratio moves on this machine from one round to the next."""
    rounds = res.get("rounds", {})
    steps, fwds = rounds.get(name), rounds.get("forward")
    if not steps or not fwds or len(steps) != len(fwds) or len(steps) < 2:
        return ""
    per = [t / (m["forwards"] * f) for t, f in zip(steps, fwds, strict=True)]
    return f"; rounds {min(per):.2f}–{max(per):.2f}"


def speed_section(files: Sequence[str | Path], base: Path) -> list[str]:
    """Per method: step time ÷ the forwards it needs and peak memory ÷ inference, each from one process; then every
    other ratio of the files."""
    out = [
        "| method | step time ÷ (n × forward) | peak memory ÷ inference | setting | benchmark |",
        "|---|---|---|---|---|",
    ]
    rest = []
    for f in files:
        res = json.loads(Path(f).read_text())
        link = f"[{Path(f).name}]({_link(str(f), base)})"
        setting = f"{res.get('device', '?')} {res.get('dtype', 'float32')}, batch {res['batch']} × {res['seq']} tokens"
        if res.get("mmap_threshold"):  # peaks with freed blocks unmapped at once: reproducible, forwards slower
            setting += f", glibc mmap threshold {res['mmap_threshold']:,} B"
        methods, other = speed_rows(res)
        for name, m in methods.items():
            step = f"{m['step']:.2f} (n = {m['forwards']}{_spread(res, name, m)})" if "step" in m else "—"
            peak = f"{m['peak']:.2f}" + (" (÷ fp32 inference)" if m.get("fp32") else "") if "peak" in m else "—"
            out.append(f"| {SPEED_LABELS[name]} | {step} | {peak} | {setting} | {link} |")
        rest += [f"| {link} | {key} | {value:.3f} |" for key, value in other.items()]
    out += ["", "Other ratios of the same files:", "", "| benchmark | ratio | value |", "|---|---|---|", *rest]
    return out + ["", "Commands: the `command` field of each JSON."]


def plot_curves(rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per task: dev accuracy (left) and training loss (right) against forward passes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in dict.fromkeys(r["task"] for r in rows):
        part = [r for r in rows if r["task"] == task and r.get("curves", {}).get("dev")]
        if not part:
            continue
        fig, (ax_dev, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
        names = labels(part)
        for r in part:
            dev, loss = r["curves"]["dev"], r["curves"]["loss"]
            (line,) = ax_dev.plot([f for f, _ in dev], [a for _, a in dev], marker="o", ms=3, label=names[r["run"]])
            if loss:  # per-step minibatch losses are noisy: an EMA (0.9), as `zotune plot --smooth 0.9`
                ys = ema([v for _, v in loss], 0.9)
                ax_loss.plot([f for f, _ in loss], ys, color=line.get_color(), lw=1.2)
        ax_dev.set(xlabel="forward passes", ylabel="dev accuracy", title=f"{task}: dev accuracy")
        ax_loss.set(xlabel="forward passes", ylabel="training loss", title=f"{task}: training loss (EMA 0.9)")
        ax_dev.legend(fontsize=7)
        fig.tight_layout()
        written.append(save_png(fig, folder / f"curves-{task}.png"))
        plt.close(fig)
    return written


def report(
    folders: Sequence[str | Path],
    speed: Sequence[str | Path],
    out: str | Path,
    gain: float = 0.05,
    baselines: Sequence[str | Path] = (),
    command: str | None = None,
    claims: str | Path | None = None,
    claims_protocol: Any = None,
) -> str:
    """Write the page to ``out`` (plots to ``out``'s folder/img) and return its text. ``claims``: the claims grid's
    results folder (its section refuses rows without their config or off the protocol: ValueError, nothing
    written); ``claims_protocol`` another protocol than the written one (tests)."""
    out = Path(out)
    base = out.parent
    rows = load_rows(folders)
    if not rows:
        raise ValueError("no rows in the given folders")
    lines = [
        "# Results",
        "",
        "Generated from committed rows and benchmark files (do not edit); regenerate with:",
        "",
    ]
    lines += ["```bash", command or "python -m zotune.bench.report ...", "```", ""]
    lines += ["## Accuracy at one forward-pass budget (dev-selected, seed 0)", ""]
    lines += sources_section(folders, base)
    lines += accuracy_section(rows, gain, base, load_baselines(baselines))
    if claims is not None:
        from .claims import PROTOCOL, Results, claims_section

        found = Results.load(claims)
        if not found.rows:
            raise ValueError(f"{claims}: no rows (runs.jsonl) for the claims section")
        lines += claims_section(claims_protocol or PROTOCOL, found, base) + [""]
    if speed:
        lines += ["## Speed and memory (ratios measured in one process)", ""] + speed_section(speed, base) + [""]
    try:
        plots = plot_curves(rows, base / "img")
    except ImportError:
        plots = []
    if plots:
        lines += ["## Curves against forward passes", ""]
        lines += [f"![{p.stem}]({_link(str(p), base)})" for p in plots] + [""]
    text = "\n".join(lines)
    atomic_write_text(out, text + "\n")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zotune.bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="folders holding runs.jsonl (python -m zotune.bench.accuracy)")
    p.add_argument("--speed", nargs="*", default=[], help="speed/memory JSONs of python -m zotune.bench")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--gain", type=float, default=0.05, help="'forwards to reach' target: zero-shot dev + gain")
    p.add_argument("--baselines", nargs="*", default=[], help="zero-shot/ICL lines of python -m zotune.bench.zeroshot")
    p.add_argument("--claims", help="the claims grid's results folder (python -m zotune.bench.claims)")
    a = p.parse_args(argv)
    command = "python -m zotune.bench.report " + " ".join(list(argv) if argv is not None else sys.argv[1:])
    try:
        text = report(a.folders, a.speed, a.out, a.gain, a.baselines, command, a.claims)
    except (OSError, ValueError, KeyError) as e:  # a missing folder or file, a malformed row: nothing is written
        p.error(str(e))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
