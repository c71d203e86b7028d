"""The claims grid: do the four seed papers' headline claims hold for SmolLM2-135M? A resumable driver and its table.

The protocol (written out in ``benchmarks/README.md``, section "Claims grid: protocol") is data in this module:
:data:`TASKS`, :data:`ROWS` (one line per method, with its fixed hyperparameters), :data:`COMPARISONS` (one line per
claim tested) and the budgets of :class:`Protocol`. Every grid cell is one ``zotune train`` run:

* ``scan`` cells: each scanned method's lr × {1/4, 1/2, 1, 2, 4} (TREC: × {1/4, 1/2, 1}) on seed 0 with a short
  budget; the best dev accuracy picks the lr (ties to the smaller lr), recorded in ``RESULTS/lr/TASK-ROW.json``
  with the scan's numbers;
* ``seeds`` cells: seeds 0, 1, 2 at the picked lr and the full budget. Stability rule: where the watchdog stopped a
  seed run (its loss diverged), that lr and every larger one leave the pick; the row's seed runs at them are set
  aside (``RESULTS/superseded.jsonl``, kept and shown) and its seeds run again at the new pick;
* ``refs`` cells: FO-LoRA and FO full (AdamW) at their usual budget and lr, the same seeds.

A finished row an amendment has since changed is set aside by hand with its reason (``set-aside``): kept, listed in
the table, in no comparison; its cell runs again under the protocol.

A cell runs as ``python -m zotune.bench.claims cell CONFIG.yaml``: the config is built with
:func:`zotune.train.run_config_from_dict` from the recipe YAML and an overrides dict, so a cell needs neither an
installed zotune nor jsonargparse (``PYTHONPATH=src`` is enough), and resumes from its newest checkpoint when it was
stopped. Finished cells are summarized (:func:`zotune.bench.accuracy.summarize`) into ``RESULTS/runs.jsonl`` with
their full config in ``RESULTS/configs/CELL.yaml``.

Commands (``bash benchmarks/claims.sh ...`` runs the same with the checkout's ``src`` on the path)::

    python -m zotune.bench.claims plan                          # every cell and its status
    python -m zotune.bench.claims run --lanes 2 --device cpu    # pending cells, 2 at a time, resumable
    python -m zotune.bench.claims run --device cuda --lanes 8 --deadline-seconds 480 --out /tmp/claims
    python -m zotune.bench.claims pack --out /tmp/claims claims.tar.gz     # finished cells without weights
    python -m zotune.bench.claims unpack claims.tar.gz          # into --out, then summarized into --results
    python -m zotune.bench.claims table                         # RESULTS/claims.md (the results page section)
    python -m zotune.bench.claims set-aside CELL --why "..."    # a finished row out of the comparisons, kept
    python -m zotune.bench.claims reach --rows fzoo --seeds 0   # a packed row's first 100 forwards, dev every 25

Papers: MeZO (Malladi et al., NeurIPS 2023), LOZO (Chen et al., ICLR 2025), MeZO-SVRG (Gautam et al., ICML 2024),
SensZOQ (Guo et al., ICLR 2025), Bilevel ZOFO (Shirkavand et al., 2025).

Example (the verdict rule)::

    >>> verdict([0.04, 0.05, 0.03])[0], verdict([0.01, -0.02, 0.02])[0], verdict([-0.05, -0.06, -0.04])[0]
    ('holds', 'inconclusive (spread larger than the difference)', 'does not hold at this scale')
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.log import atomic_write_bytes, atomic_write_text

# --------------------------------------------------------------------------------------------------------------------
# the protocol, as data

TASKS: dict[str, dict[str, Any]] = {
    # MeZO protocol: 500 train and 200 dev drawn from SST-2 train (data seed 0); test = all 872 validation sentences
    "sst2": {"task": "sst2", "protocol": "mezo", "seed": 0, "n_train": 500, "n_dev": 200, "n_test": 872},
    # LM-BFF k-shot: 16 per class for train and for dev (data seed 0); test = 500 sentences of TREC test
    "trec": {"task": "trec", "protocol": "kshot", "k": 16, "seed": 0, "n_test": 500},
}

SPARSE = {"peft": "sparse", "sparsity": 0.001, "mask": "fisher"}  # SensZOQ: 0.1 % of the Linear entries, Fisher mask


@dataclass(frozen=True, eq=False)
class Row:
    """One method of the grid: one line in :data:`ROWS`.

    Attributes:
        name: the row's name in cell names (``sst2-<name>-s0``) and tables.
        method: the registered method (the config's ``method``).
        hparams: its config section's fixed values (``benchmarks/suite.sh``'s), learning rate(s) included.
        fwd_per_step: forward passes per step as the method's stepper counts them, on average (sets ``eval_every``
            so that dev comes every ``eval_forwards``): MeZO 2, MeZO-SVRG with q = 4 and a 64-example anchor 5,
            Bilevel ZOFO with K = 3 inner steps 11.
        model: ``model`` section overrides (PEFT mode, sparse mask, quantization).
        scale: the ``hparams`` the lr scan multiplies by each grid factor, together (their ratios stay).
        kind: ``zo`` (scanned; pure ZO), ``hybrid`` (scanned; forwards and backwards: Bilevel ZOFO) or ``ref``
            (first-order reference: no scan, ``ref_budget``).
        rows: how many batch-size blocks of rows one counted forward evaluates (1 for a plain forward; a packed
            forward of 2n perturbed copies of the batch that its stepper counts as one forward: 2n). The budget is in
            forward *rows* ÷ batch size, so such a method gets ``budget // rows`` counted forwards.
        path: which evaluation path the method runs (``sequential``: one forward per perturbation; ``packed``):
            shown per row in the tables.
        needs: modules the row imports (``bitsandbytes`` for the NF4 base); where one is missing its cells are
            ``unavailable``.
        profiles: the profiles (:data:`PROFILES`) whose grid holds the row.
        label: the row's name in tables.
        extra_factors: lr scan factors beyond the protocol's (an amendment, for a row whose pick lay on the grid's
            edge with the best dev still rising towards it).
        tasks: the tasks whose grid holds the row (empty: every task of the protocol).
        packed_on: task → the packed method that runs the row on that task instead of ``method``: the same estimator
            step for step, tested equal to the sequential path to float tolerance, at fewer seconds per forward (an
            amendment; the tables show the path per task).
    """

    name: str
    method: str
    hparams: dict[str, Any]
    fwd_per_step: float = 2.0
    model: dict[str, Any] = field(default_factory=dict)
    scale: tuple[str, ...] = ("lr",)
    kind: str = "zo"
    rows: int = 1
    path: str = "sequential"
    needs: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ("cpu", "gpu")
    label: str = ""
    extra_factors: tuple[float, ...] = ()
    tasks: tuple[str, ...] = ()
    packed_on: Mapping[str, str] = field(default_factory=dict)

    @property
    def scanned(self) -> bool:
        return self.kind in ("zo", "hybrid")

    def runs_on(self, task: str) -> bool:
        return not self.tasks or task in self.tasks

    def method_on(self, task: str) -> str:
        """The registered method that runs the row on ``task``."""
        return self.packed_on.get(task, self.method)

    def path_on(self, task: str) -> str:
        """The evaluation path the row runs on ``task`` (``sequential`` or ``packed``)."""
        return "packed" if task in self.packed_on else self.path


# fmt: off
ROWS: tuple[Row, ...] = (
    Row("mezo", "mezo", {"lr": 5e-5, "eps": 1e-3}, label="MeZO"),
    # on TREC through the packed ± pair (the same estimator; an amendment sizing the grid to the CPU time there is)
    Row("lozo", "lozo", {"lr": 5e-5, "eps": 1e-3, "rank": 2, "refresh_every": 50}, label="LOZO",
        packed_on={"trec": "packed_lozo"}),
    Row("lozo-m", "lozo_m", {"lr": 5e-5, "eps": 1e-3, "rank": 2, "refresh_every": 50, "beta": 0.9}, label="LOZO-M",
        packed_on={"trec": "packed_lozo_m"}),
    Row("mezo-svrg", "mezo_svrg", {"lr": 5e-5, "anchor_lr": 1e-4, "eps": 1e-3, "q": 4, "anchor_size": 64},
        fwd_per_step=5.0, scale=("lr", "anchor_lr"), label="MeZO-SVRG"),
    # added after 2a/2b failed at the row above: the paper's q, loss-triggered annealing and η₁ = 10 η₂ (a diagnosis
    # of the SST-2 verdict, so SST-2 only)
    Row("mezo-svrg-paper", "mezo_svrg", {"lr": 1e-5, "anchor_lr": 1e-4, "eps": 1e-3, "q": 2, "anchor_size": 64,
        "anneal": 4.0}, fwd_per_step=6.0, scale=("lr", "anchor_lr"), label="MeZO-SVRG (paper's q 2, anneal 4)",
        tasks=("sst2",)),
    Row("senszoq", "mezo", {"lr": 1e-4, "eps": 1e-3}, model={**SPARSE, "quantize": "nf4"}, needs=("bitsandbytes",),
        profiles=("cpu",), label="SensZOQ (0.1 % Fisher, NF4 base)"),
    Row("senszoq-fp32base", "mezo", {"lr": 1e-4, "eps": 1e-3}, model={**SPARSE, "quantize": "none"},
        profiles=("gpu",), label="SensZOQ (0.1 % Fisher, fp32 base)"),
    # × 2 added after its TREC pick sat on the top edge of TREC's × {1/4, 1/2, 1} with dev rising with lr (SST-2's
    # grid holds × 2 already)
    Row("zofo", "zofo", {"lr": 5e-5, "eps": 1e-3, "lr_lower": 1e-3, "lr_upper": 1e-3, "lam": 1.0, "inner_steps": 3},
        fwd_per_step=11.0, model={"peft": "lora"}, scale=("lr", "lr_lower", "lr_upper"), kind="hybrid",
        label="Bilevel ZOFO", extra_factors=(2.0,)),
    # packed probes (every probe of a step in one batched forward; rows ÷ batch counted as forwards). Their
    # accuracy-per-compute comparison is on SST-2 (the main job's task), so they run there only.
    Row("packed-lozo", "packed_lozo", {"lr": 5e-5, "eps": 1e-3, "rank": 2, "refresh_every": 50}, path="packed",
        label="LOZO, packed ± pair", tasks=("sst2",)),
    Row("nspsa4", "packed_lozo", {"lr": 1e-4, "eps": 1e-3, "rank": 2, "refresh_every": 50, "num_directions": 4},
        fwd_per_step=8.0, path="packed", label="n-SPSA (n = 4, packed)", tasks=("sst2",)),
    Row("per-example", "per_example", {"lr": 5e-5, "eps": 1e-3, "rank": 2, "refresh_every": 50}, path="packed",
        label="one probe per example (packed)", tasks=("sst2",)),
    # extended upwards after its pick sat on the top edge with dev rising with lr (its step is divided by the std of
    # the probe losses, so its lr is on another scale than MeZO's): × 8, 16, then × 32, 64 when 16 was still best,
    # then × 128, 256 when 64 was
    Row("fzoo", "fzoo", {"lr": 1e-4, "eps": 1e-3, "rank": 2, "refresh_every": 50, "num_directions": 8},
        fwd_per_step=9.0, path="packed", label="FZOO rule (n = 8, packed)",
        extra_factors=(8.0, 16.0, 32.0, 64.0, 128.0, 256.0),
        tasks=("sst2",)),
    Row("fo-lora", "adamw", {"lr": 5e-4}, fwd_per_step=1.0, model={"peft": "lora"}, kind="ref",
        label="FO-LoRA (AdamW)"),
    Row("fo-full", "adamw", {"lr": 1e-5}, fwd_per_step=1.0, kind="ref", label="FO full (AdamW)"),
)
# fmt: on

PROFILES: dict[str, str] = {"cpu": "cpu", "gpu": "cuda"}
"""Profile → the device its cells run on. A row is in a profile's grid when its ``profiles`` names it: SensZOQ runs
over the NF4 base (bitsandbytes) in the ``cpu`` profile and over the fp32 base in the ``gpu`` profile."""

BEST_ZO = "best-zo"
"""In a comparison: the pure-ZO row (kind ``zo``) with the highest mean test accuracy on the task."""


@dataclass(frozen=True)
class Comparison:
    """One tested claim: row ``a`` against row ``b`` on every task, paired by seed.

    ``measure`` says what is compared; ``x_s`` is positive on seed s where the claim holds there:

    * ``test``: x_s = test(a) − test(b) + margin (margin 0: a beats b; margin m: a is at most m below b);
    * ``reach``: x_s = margin − F_s ÷ M_s, with M_s the forwards MeZO (``b``) needed to reach its best dev
      accuracy on seed s and F_s those ``a`` needed to reach the same accuracy (its full budget when it never did,
      also when its run was stopped early: a lower bound, which can only favour the claim);
    * ``step``: x_s = 1 − step(a) ÷ step(b), median seconds per step, the same device for both;
    * ``memory``: x_s = 1 − peak(a) ÷ peak(b), peak memory of the run (CPU: resident set), the same device.
    """

    id: str
    claim: int
    text: str
    a: str
    b: str
    measure: str = "test"
    margin: float = 0.0


# fmt: off
COMPARISONS: tuple[Comparison, ...] = (
    Comparison("1a", 1, "LOZO > MeZO (test)", "lozo", "mezo"),
    Comparison("1b", 1, "LOZO-M > MeZO (test)", "lozo-m", "mezo"),
    Comparison("1c", 1, "LOZO within 3 points of FO full (test)", "lozo", "fo-full", margin=0.03),
    Comparison("1d", 1, "LOZO-M within 3 points of FO full (test)", "lozo-m", "fo-full", margin=0.03),
    Comparison("2a", 2, "MeZO-SVRG > MeZO (test)", "mezo-svrg", "mezo"),
    Comparison("2b", 2, "MeZO-SVRG reaches MeZO's peak dev with ≤ 0.6 × MeZO's forwards", "mezo-svrg", "mezo",
               measure="reach", margin=0.6),
    Comparison("2c", 2, "MeZO-SVRG with the paper's q, annealing and η₁ = 10 η₂ > MeZO (test)", "mezo-svrg-paper",
               "mezo"),
    Comparison("3a", 3, "SensZOQ (NF4) > MeZO (test)", "senszoq", "mezo"),
    Comparison("3b", 3, "SensZOQ (NF4) step faster than MeZO's", "senszoq", "mezo", measure="step"),
    Comparison("3c", 3, "SensZOQ (NF4) peak memory below MeZO's", "senszoq", "mezo", measure="memory"),
    Comparison("3d", 3, "SensZOQ (fp32 base) > MeZO (test)", "senszoq-fp32base", "mezo"),
    Comparison("3e", 3, "SensZOQ (fp32 base) step faster than MeZO's", "senszoq-fp32base", "mezo", measure="step"),
    Comparison("4a", 4, "Bilevel ZOFO > FO-LoRA (test)", "zofo", "fo-lora"),
    Comparison("4b", 4, "Bilevel ZOFO > the best pure-ZO method (test)", "zofo", BEST_ZO),
    Comparison("6a", 5, "packed n-SPSA reaches MeZO's peak dev with ≤ 1/4 of its rows", "nspsa4", "mezo",
               measure="reach", margin=0.25),
    Comparison("6b", 5, "per-example probes reach MeZO's peak dev with ≤ 1/4 of its rows", "per-example", "mezo",
               measure="reach", margin=0.25),
    Comparison("6c", 5, "FZOO rule reaches MeZO's peak dev with ≤ 1/4 of its rows", "fzoo", "mezo",
               measure="reach", margin=0.25),
    Comparison("6d", 5, "packed LOZO step faster than sequential LOZO's", "packed-lozo", "lozo", measure="step"),
    Comparison("5", 0, "best pure-ZO method within 3 points of FO full (test)", BEST_ZO, "fo-full", margin=0.03),
)
# fmt: on

CLAIMS = {
    1: "LOZO / LOZO-M outperform MeZO and approach first-order fine-tuning (Chen et al., ICLR 2025)",
    2: "MeZO-SVRG improves test accuracy over MeZO and reaches MeZO's peak with about half the compute "
    "(Gautam et al., ICML 2024)",
    3: "SensZOQ: ZO on 0.1 % sensitive parameters beats full-parameter ZO, with a wall-clock speed-up and little "
    "memory over a 4-bit base (Guo et al., ICLR 2025)",
    4: "Bilevel ZOFO outperforms FO-LoRA and ZO methods in single-task fine-tuning (Shirkavand et al., 2025)",
    5: "Packed probes (frontier: EGGROLL, FZOO, GRZO) need several times fewer rows than MeZO",
    0: "The best pure-ZO method against FO full (the target: within 3 points on SST-2)",
}


@dataclass(frozen=True, eq=False)
class Protocol:
    """Everything that decides the grid. :data:`PROTOCOL` is the one written in ``benchmarks/README.md``; tests build
    small ones (a tiny model, a few forwards)."""

    model: str = "smollm2-135m"
    tasks: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: TASKS)
    rows: tuple[Row, ...] = ROWS
    comparisons: tuple[Comparison, ...] = COMPARISONS
    seeds: tuple[int, ...] = (0, 1, 2)
    scan_seed: int = 0
    scan_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    # per task, a scan grid other than scan_factors (an amendment: on SST-2 every sequential row's pick lay at × 1/4
    # or × 1/2; the one best dev above × 1, MeZO-SVRG's at × 2, diverged in a seed run)
    task_factors: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: {"trec": (0.25, 0.5, 1.0)})
    budget: int = 2000  # forwards of batch_size rows per seed cell (ZO and hybrid)
    scan_budget: int = 500
    ref_budget: int = 200  # FO references: forward + backward passes
    eval_forwards: int = 200  # dev every this many forwards (ZO cells)
    ref_eval_forwards: int = 40  # FO references: as benchmarks/suite.sh
    batch_size: int = 16
    recipe: str = "recipes/smollm2-sst2-mezo.yaml"
    fo_full_committed: Mapping[str, float] = field(default_factory=lambda: {"sst2": 0.869})
    # sample efficiency at fine resolution (:func:`run_reach`): the packed rows' first reach_forwards with dev every
    # reach_every forwards, against MeZO's dev after reach_target forwards (200 steps); the target is a quarter of it
    reach_rows: tuple[str, ...] = ("packed-lozo", "nspsa4", "per-example", "fzoo")
    reach_task: str = "sst2"
    reach_forwards: int = 100
    reach_every: int = 25
    reach_target: int = 400

    def factors(self, row: Row, task: str) -> tuple[float, ...]:
        """The lr scan factors of ``row`` on ``task``: the protocol's (the task's own grid where it has one), and
        the row's extra ones."""
        return tuple(sorted(set(self.task_grid(task)) | set(row.extra_factors)))

    def task_grid(self, task: str) -> tuple[float, ...]:
        """The protocol's lr scan factors on ``task`` before any row's extension: the task's own, else the default."""
        return tuple(self.task_factors.get(task, self.scan_factors))

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r} in the protocol (rows: {', '.join(r.name for r in self.rows)})")


PROTOCOL = Protocol()

# --------------------------------------------------------------------------------------------------------------------
# cells


@dataclass(frozen=True, eq=False)
class Cell:
    """One ``zotune train`` run of the grid. ``factor`` is the scan's lr factor (None outside the scan)."""

    task: str
    row: Row
    phase: str  # scan | seeds | refs
    seed: int
    factor: float | None = None

    @property
    def name(self) -> str:
        if self.phase == "scan":
            return f"{self.task}-{self.row.name}-scan-lr{self.scan_lr:g}"
        return f"{self.task}-{self.row.name}-s{self.seed}"

    @property
    def scan_lr(self) -> float:
        assert self.factor is not None
        return self.row.hparams[self.row.scale[0]] * self.factor

    @property
    def method(self) -> str:
        return self.row.method_on(self.task)

    @property
    def path(self) -> str:
        return self.row.path_on(self.task)


def grid(protocol: Protocol = PROTOCOL, profile: str | None = None) -> list[Cell]:
    """Every cell, in launch order: the scans, then the references, then the seeds (each by task, then row)."""
    rows = [r for r in protocol.rows if profile is None or profile in r.profiles]
    scans = [
        Cell(t, r, "scan", protocol.scan_seed, f) for t in protocol.tasks for r in rows if r.scanned and r.runs_on(t)
        for f in protocol.factors(r, t)
    ]  # fmt: skip
    refs = [
        Cell(t, r, "refs", s) for t in protocol.tasks for r in rows if r.kind == "ref" and r.runs_on(t)
        for s in protocol.seeds
    ]  # fmt: skip
    seeds = [
        Cell(t, r, "seeds", s) for t in protocol.tasks for r in rows if r.scanned and r.runs_on(t)
        for s in protocol.seeds
    ]  # fmt: skip
    return scans + refs + seeds


def scaled(row: Row, factor: float) -> dict[str, Any]:
    """The row's hyperparameters with its ``scale`` keys multiplied by ``factor``."""
    return {k: (v * factor if k in row.scale else v) for k, v in row.hparams.items()}


def cell_hparams(cell: Cell, lr: float | None) -> dict[str, Any]:
    """The cell's method section: the scan's factor, the picked ``lr`` (seeds), or the row's own values (refs)."""
    if cell.phase == "scan":
        return scaled(cell.row, cell.factor)
    if cell.phase == "seeds":
        if lr is None:
            raise ValueError(f"{cell.name}: no lr picked yet (its lr scan is not finished)")
        return scaled(cell.row, lr / cell.row.hparams[cell.row.scale[0]])
    return dict(cell.row.hparams)


def budget_of(cell: Cell, protocol: Protocol) -> int:
    """The cell's budget in forwards of ``batch_size`` rows."""
    return {"scan": protocol.scan_budget, "seeds": protocol.budget, "refs": protocol.ref_budget}[cell.phase]


def eval_every(cell: Cell, protocol: Protocol) -> int:
    every = protocol.ref_eval_forwards if cell.phase == "refs" else protocol.eval_forwards
    return max(1, round(every / (cell.row.fwd_per_step * cell.row.rows)))


def recipe_path(protocol: Protocol) -> Path:
    """The recipe, from the checkout this module runs from, else from the current folder."""
    here = Path(__file__).resolve().parents[3] / protocol.recipe
    for path in (here, Path(protocol.recipe)):
        if path.is_file():
            return path
    raise FileNotFoundError(f"the recipe {protocol.recipe} is neither in this checkout nor in the current folder")


def cell_tree(
    cell: Cell, protocol: Protocol, *, out: Path, device: str, lr: float | None = None, model: str | None = None
) -> dict[str, Any]:
    """The cell's config as a nested dict: the recipe YAML with the protocol's overrides (model, data, budget,
    evaluation, method section, seed, out). Validated by :func:`zotune.train.run_config_from_dict` before use."""
    import yaml

    from ..methods import METHODS

    tree = yaml.safe_load(recipe_path(protocol).read_text())
    for name in list(tree):  # the recipe's own method section (mezo) is not the cell's
        if name in METHODS and name != cell.method:
            del tree[name]
    every = eval_every(cell, protocol)
    tree["model"] = {**tree.get("model", {}), "name": model or protocol.model, "dtype": "float32", "device": device}
    tree["model"].update(cell.row.model)
    tree["data"] = dict(protocol.tasks[cell.task])
    tree["train"] = {
        **tree.get("train", {}),
        "steps": 100_000,  # the forward budget ends the run
        "batch_size": protocol.batch_size,
        "grad_accum": 1,
        "max_forwards": budget_of(cell, protocol) // cell.row.rows,
        "eval_every": every,
        "checkpoint_every": every,
        "keep_checkpoints": 1,
        "early_stopping": 0,
        "test": True,
        "test_at_start": True,
        "progress": False,
        "tensorboard": False,
    }
    tree["method"] = cell.method
    tree[cell.method] = cell_hparams(cell, lr)
    tree["seed"] = cell.seed
    tree["out"] = str(out / cell.name)
    for key in ("resume", "overwrite", "allow_config_change"):
        tree.pop(key, None)
    return tree


def resolved(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` validated and with every default filled in (what a run directory's ``config.yaml`` holds)."""
    from ..train.config import config_to_dict, run_config_from_dict

    return config_to_dict(run_config_from_dict(tree))


# keys that may differ from the protocol: where the run lives and ran, how it was started, how it reported
_FREE_KEYS = {"out", "model.device", "model.name", "data.data_dir", "resume", "overwrite", "allow_config_change"}
_FREE_KEYS |= {"train.progress", "train.tensorboard", "train.dist_timeout", "train.sync_every"}


def protocol_diff(found: dict[str, Any], expected: dict[str, Any], protocol: Protocol) -> list[str]:
    """What in a cell's config differs from the protocol's config for that cell, as ``key X (protocol: Y)``.

    Keys a run's config lacks (added to zotune after it ran) and other methods' sections are not counted. The
    model may be named by its packaged name or by the GGUF file it comes from (a machine without the wheel)."""
    from ..methods import METHODS
    from ..train.config import flatten

    fa, fb = flatten(found), flatten(expected)
    unused = set(METHODS) - {expected.get("method")}
    out = []
    for key, want in fb.items():
        if key in _FREE_KEYS or key.split(".", 1)[0] in unused or key not in fa:
            continue
        got = fa[key]
        same = (
            math.isclose(got, want, rel_tol=1e-9, abs_tol=0.0)
            if isinstance(got, float) and isinstance(want, float | int) and not isinstance(want, bool)
            else got == want
        )
        if not same:
            out.append(f"{key} {got!r} (protocol: {want!r})")
    name = fa.get("model.name")
    if name is not None and not _same_model(str(name), protocol.model):
        out.append(f"model.name {name!r} (protocol: {protocol.model!r})")
    return out


def _same_model(name: str, wanted: str) -> bool:
    """``name`` is ``wanted``, the GGUF file the packaged model ``wanted`` comes from (carried to a machine without
    its wheel), or the folder zotune converts that file into (``<wanted>-<digest>``)."""
    if name == wanted:
        return True
    from ..models.load import PACKAGED

    spec = PACKAGED.get(wanted)
    base = Path(name).name
    return spec is not None and (
        base == Path(spec.relpath).name or re.fullmatch(rf"{re.escape(wanted)}-[0-9a-f]{{12}}", base) is not None
    )


# --------------------------------------------------------------------------------------------------------------------
# results: rows, lr picks, statuses


@dataclass
class Results:
    """``RESULTS/runs.jsonl`` (one row per finished cell), ``RESULTS/configs/`` and ``RESULTS/lr/``."""

    folder: Path
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    superseded: list[dict[str, Any]] = field(default_factory=list)  # seed rows set aside by the stability rule
    reach: dict[str, dict[str, Any]] = field(default_factory=dict)  # RESULTS/reach.jsonl, by run name

    @classmethod
    def load(cls, folder: str | Path) -> Results:
        folder = Path(folder)
        rows = {row.get("cell") or row["run"]: row for row in _read_jsonl(folder / "runs.jsonl")}
        reach = {row["run"]: row for row in _read_jsonl(folder / "reach.jsonl")}
        return cls(folder, rows, _read_jsonl(folder / "superseded.jsonl"), reach)

    def config_path(self, cell: str) -> Path:
        return self.folder / "configs" / f"{cell}.yaml"

    def superseded_config_path(self, row: dict[str, Any]) -> Path:
        return self.folder / "configs" / "superseded" / f"{row['cell']}-lr{row['lr']:g}.yaml"

    def set_aside(self, names: Sequence[str], order: Sequence[str]) -> None:
        """Write the rows ``names`` (added to ``superseded`` already) out of ``runs.jsonl``: ``superseded.jsonl``
        first, so that a crash in between leaves a row in both files, never in neither."""
        text = "".join(json.dumps(r) + "\n" for r in self.superseded)
        atomic_write_text(self.folder / "superseded.jsonl", text)
        for name in names:
            self.rows.pop(name, None)
        self.save(order, drop=names)

    def save(self, order: Sequence[str], drop: Sequence[str] = ()) -> None:
        """Write ``runs.jsonl``, keeping the rows another process added to it since this one was loaded (a
        ``summarize`` or ``unpack`` beside a running driver); a row held here wins over the file's. ``drop``: rows
        removed on purpose (set aside), not taken back from the file."""
        for name, row in Results.load(self.folder).rows.items():
            if name not in drop:
                self.rows.setdefault(name, row)
        rank = {name: i for i, name in enumerate(order)}
        rows = sorted(self.rows.values(), key=lambda r: (rank.get(r["cell"], len(rank)), r["cell"]))
        atomic_write_text(self.folder / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {n}: not JSON ({err.msg})") from None
    return rows


def _diverged(row: dict[str, Any]) -> bool:
    return str(row.get("stopped") or "").startswith("watchdog")


def unstable_lrs(results: Results, task: str, row: str) -> list[float]:
    """The lrs at which the watchdog stopped a seed run of (task, row), kept or set aside (the stability rule)."""
    found = [*results.rows.values(), *results.superseded]
    return sorted({r["lr"] for r in found if r.get("task") == task and r.get("row") == row
                   and r.get("phase") == "seeds" and r.get("lr") is not None and _diverged(r)})  # fmt: skip


def _at_or_above(lr: float, ceiling: float) -> bool:
    return lr >= ceiling * (1 - 1e-9)  # lrs are products of floats: a relative tolerance


def pick_lr(protocol: Protocol, results: Results, task: str, row: Row) -> dict[str, Any] | None:
    """The lr scan's pick for (task, row) once every scan cell has a row: the best best-dev accuracy, ties to the
    smaller lr. None while the scan is unfinished. The record says whether the pick lies on the grid's edge (the
    best lr may then lie outside the grid) and whether any lr beat the zero-shot dev accuracy.

    Stability rule: the lrs at or above one where the watchdog stopped a seed run (:func:`unstable_lrs`; the
    500-forward scan is too short to show a divergence that 2,000 forwards do) are left out of the pick and listed
    under ``unstable``; ``lr`` is None when no lr of the scan is left."""
    scan = [c for c in grid(protocol) if c.task == task and c.row.name == row.name and c.phase == "scan"]
    found = [results.rows.get(c.name) for c in scan]
    if not scan or any(r is None for r in found):
        return None
    points = sorted(({"lr": c.scan_lr, "factor": c.factor, "cell": c.name, "best_dev": r["best_dev"],
                      "best_step": r["best_step"], "test": r.get("test")} for c, r in zip(scan, found, strict=True)),
                    key=lambda p: p["lr"])  # fmt: skip
    unstable = unstable_lrs(results, task, row.name)
    stable = [p for p in points if not unstable or not _at_or_above(p["lr"], unstable[0])]
    best = max(stable, key=lambda p: (p["best_dev"], -p["lr"])) if stable else None
    zero_shot = found[0].get("zero_shot_dev")
    pick = {
        "task": task,
        "row": row.name,
        "key": row.scale[0],
        "lr": best and best["lr"],
        "rule": "highest best dev accuracy of the scan (seed 0); ties go to the smaller lr",
        "scan_budget": protocol.scan_budget,
        "grid": points,
        "edge": best is not None and (best is points[0] or best is points[-1]),
        "zero_shot_dev": zero_shot,
        "beats_zero_shot": best is not None and (zero_shot is None or best["best_dev"] > zero_shot),
    }
    if unstable:
        pick["rule"] += (f"; stability rule: lrs from {unstable[0]:.3g} up are left out (the watchdog stopped a "
                         "seed run there)")  # fmt: skip
        pick["unstable"] = unstable
    return pick


def picks(protocol: Protocol, results: Results) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for task in protocol.tasks:
        for row in protocol.rows:
            if row.scanned and (p := pick_lr(protocol, results, task, row)) is not None:
                out[(task, row.name)] = p
    return out


@dataclass
class Status:
    """A cell's state: done, unfinished, missing, waiting (its lr scan is not finished), conflict (a folder or row
    that does not follow the protocol: named, never overwritten) or unavailable (a module it needs is missing)."""

    cell: Cell
    state: str
    detail: str = ""
    resume_step: int | None = None
    forwards_done: int = 0


def _checkpoint_step(run: Path) -> int | None:
    from ..train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run)
    if latest is None:
        return None
    m = re.search(r"(\d+)$", latest.name)
    return int(m.group(1)) if m else None


def _forwards_at(run: Path, step: int) -> int:
    done = 0
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if rec.get("kind") == "train" and rec.get("step", 0) <= step:
                    done = max(done, rec.get("forwards", 0))
    return done


_EXPECTED: dict[tuple[int, str, float | None], dict[str, Any]] = {}
_YAML: dict[tuple[str, int, int], dict[str, Any]] = {}


def expected_config(cell: Cell, protocol: Protocol, lr: float | None) -> dict[str, Any]:
    """The resolved config the protocol gives ``cell`` (memoized: the driver asks for it at every change)."""
    key = (id(protocol), cell.name, lr)
    if key not in _EXPECTED:
        _EXPECTED[key] = resolved(cell_tree(cell, protocol, out=Path("."), device="cpu", lr=lr))
    return _EXPECTED[key]


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's contents (memoized by path, size and modification time)."""
    import yaml

    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _YAML:
        _YAML[key] = yaml.safe_load(path.read_text())
    return _YAML[key]


_RESUME_SETS = ("train.steps ", "train.max_forwards ")  # a resumed run takes the protocol's values of these


def check_cell_config(
    cell: Cell, protocol: Protocol, found: dict[str, Any], lr: float | None, unfinished: bool = False
) -> list[str]:
    """The differences of a cell's config from the protocol (empty: it follows it). An ``unfinished`` run may differ
    in its step and forward budgets: resuming it sets them to the protocol's (zotune allows both to change)."""
    if cell.phase == "seeds" and lr is None:
        return ["its lr scan is not finished, so no lr is picked to check it against"]
    diff = protocol_diff(found, expected_config(cell, protocol, lr), protocol)
    return [d for d in diff if not d.startswith(_RESUME_SETS)] if unfinished else diff


def statuses(
    protocol: Protocol, out: Path, results: Results, profile: str | None = None
) -> tuple[list[Status], dict[tuple[str, str], dict[str, Any]]]:
    """Every cell's status (read-only: nothing is written) and the lr picks made so far."""
    chosen = picks(protocol, results)
    found_missing = {m: importlib.util.find_spec(m) is None for r in protocol.rows for m in r.needs}
    out_list = []
    for cell in grid(protocol, profile):
        lr = chosen.get((cell.task, cell.row.name), {}).get("lr") if cell.phase == "seeds" else None
        run = out / cell.name
        row = results.rows.get(cell.name)
        if row is not None:
            kept = results.config_path(cell.name)
            if not kept.is_file():
                out_list.append(Status(cell, "conflict", f"its row has no config ({kept} is missing)"))
                continue
            diff = check_cell_config(cell, protocol, read_yaml(kept), lr)
            if diff:
                out_list.append(Status(cell, "conflict", f"its config differs from the protocol: {'; '.join(diff)}"))
                continue
            out_list.append(Status(cell, "done", _done_detail(row)))
            continue
        if run.exists() and any(run.iterdir()):
            if not (run / "config.yaml").is_file():
                out_list.append(Status(cell, "conflict", f"{run} exists but is not a run folder (no config.yaml)"))
                continue
            if cell.phase == "seeds" and lr is None:
                out_list.append(Status(cell, "conflict", f"{run} exists but its lr scan is not finished"))
                continue
            finished = (run / "results.json").is_file()
            diff = check_cell_config(cell, protocol, read_yaml(run / "config.yaml"), lr, unfinished=not finished)
            if diff:
                out_list.append(
                    Status(cell, "conflict", f"{run}: config differs from the protocol: {'; '.join(diff)}")
                )
                continue
            if finished:
                out_list.append(Status(cell, "done", "finished, not summarized yet (run or summarize does it)"))
                continue
            step = _checkpoint_step(run)
            if step is None:
                out_list.append(Status(cell, "unfinished", "no checkpoint yet: starts again"))
            else:
                done = _forwards_at(run, step)
                detail = f"resumes from step {step} ({done} of {budget_of(cell, protocol) // cell.row.rows} forwards)"
                out_list.append(Status(cell, "unfinished", detail, step, done))
            continue
        need = [m for m in cell.row.needs if found_missing[m]]
        if need:
            out_list.append(Status(cell, "unavailable", f"needs {', '.join(need)}, not installed here"))
        elif cell.phase == "seeds" and lr is None:
            if (pick := chosen.get((cell.task, cell.row.name))) is not None:
                detail = f"no stable lr: the watchdog stopped seed runs at every lr of the scan ({_lrs(pick)})"
            else:
                n = sum(1 for c in grid(protocol) if c.phase == "scan" and c.task == cell.task
                        and c.row.name == cell.row.name and c.name in results.rows)  # fmt: skip
                detail = f"lr scan {n} of {len(protocol.factors(cell.row, cell.task))} done"
            out_list.append(Status(cell, "waiting", detail))
        else:
            out_list.append(Status(cell, "missing"))
    return out_list, chosen


def _lrs(pick: dict[str, Any]) -> str:
    return ", ".join(f"{v:.3g}" for v in pick.get("unstable", ()))


def _done_detail(row: dict[str, Any]) -> str:
    text = f"best dev {row['best_dev']:.3f}, test {row['test']:.3f}" if row.get("test") is not None else "finished"
    if _diverged(row):
        text += " (stopped by the watchdog)"
    return text


# --------------------------------------------------------------------------------------------------------------------
# summarizing finished cells


def summarize_cell(run: Path, cell: Cell) -> dict[str, Any]:
    """The cell's row: :func:`zotune.bench.accuracy.summarize` plus where it sits in the grid, its device, its total
    seconds and its rows accounting (``forward_equivalents`` = counted forwards × ``rows``)."""
    import yaml

    from .accuracy import summarize

    row = summarize(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    res = json.loads((run / "results.json").read_text())
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").is_file() else {}
    section = cfg.get(cell.method, {})
    row.update(
        cell=cell.name,
        phase=cell.phase,
        row=cell.row.name,
        kind=cell.row.kind,
        path=cell.path,
        seed=cfg["seed"],
        lr=section.get(cell.row.scale[0]),
        device=env.get("device") or cfg["model"].get("device"),
        seconds=res.get("seconds"),
        stopped=res.get("stopped"),
        rows_per_forward=cell.row.rows,
        forward_equivalents=res["forwards"] * cell.row.rows,
    )
    return row


def summarize_finished(
    protocol: Protocol,
    out: Path,
    results: Results,
    profile: str | None = None,
    log: Callable[[str], None] = print,
    prune: str | None = None,
) -> list[str]:
    """Summarize every finished cell in ``out`` that has no row yet (protocol-checked), write the lr picks; return the
    cells added. Repeats until nothing is added (a finished scan picks the lr its seed cells are checked against).
    A cell whose config differs from the protocol is named and left out. ``prune``: as :func:`run_grid`'s."""
    from .accuracy import save_config

    added: list[str] = []
    while True:
        new = []
        sts = statuses(protocol, out, results, profile)[0]
        for st in sts:
            if st.state == "done" and st.cell.name not in results.rows:
                run = out / st.cell.name
                results.rows[st.cell.name] = summarize_cell(run, st.cell)
                save_config(run, results.config_path(st.cell.name))
                if prune:
                    prune_run(run, _prune_what(prune, st.cell))
                new.append(st.cell.name)
        if not new:
            break
        added += new
        results.save([c.name for c in grid(protocol)])
    for name in set_aside_unstable(protocol, results, out):
        log(f"set aside (stability rule): {name}; its seed runs again at the new pick")
    sts = statuses(protocol, out, results, profile)[0]
    for st in sts:
        if st.state == "conflict":
            log(f"not summarized: {st.cell.name}: {st.detail}")
    write_picks(protocol, results)
    return added


def set_aside_unstable(protocol: Protocol, results: Results, out: Path | None, busy: Sequence[str] = ()) -> list[str]:
    """The stability rule's moves: every seed row at an lr at or above one where the watchdog stopped a seed run of
    its (task, row) goes from ``runs.jsonl`` to ``superseded.jsonl`` (its config to ``configs/superseded/``), and
    every such seed cell's run folder in ``out`` (finished or not; ``busy`` cells, running now, are left alone) to
    ``out/superseded/CELL-lrLR``, so the cell runs again, fresh, at the new pick. Returns the cells moved."""
    moved: list[str] = []
    seed_cells = {c.name: c for c in grid(protocol) if c.phase == "seeds"}
    for name, row in list(results.rows.items()):
        cell = seed_cells.get(name)
        unstable = unstable_lrs(results, row.get("task"), row.get("row")) if cell else []
        if not unstable or row.get("lr") is None or not _at_or_above(row["lr"], unstable[0]):
            continue
        kept, dest = results.config_path(name), results.superseded_config_path(row)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if kept.is_file():
            os.replace(kept, dest)
        if not any(r["cell"] == name and r["lr"] == row["lr"] for r in results.superseded):
            results.superseded.append(row)
        moved.append(name)
    if moved:
        results.set_aside(moved, [c.name for c in grid(protocol)])
    for name, cell in seed_cells.items() if out is not None else ():
        run = out / name
        if name in busy or not (run / "config.yaml").is_file():
            continue
        lr = read_yaml(run / "config.yaml").get(cell.method, {}).get(cell.row.scale[0])
        unstable = unstable_lrs(results, cell.task, cell.row.name)
        if lr is not None and unstable and _at_or_above(lr, unstable[0]):
            _move_run_aside(out, name, lr)
            if name not in moved:
                moved.append(name)
    return moved


def _move_run_aside(out: Path, name: str, lr: float) -> None:
    """``out/CELL`` → ``out/superseded/CELL-lrLR`` (replacing an older one there), so the cell starts fresh."""
    aside = out / "superseded" / f"{name}-lr{lr:g}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(out / name, aside)


def set_aside(protocol: Protocol, results: Results, out: Path | None, name: str, why: str) -> dict[str, Any]:
    """Set a finished cell's row aside by hand, with the reason: for a row whose cell an amendment changed after it
    ran (e.g. the path the row takes on a task). Its row goes from ``runs.jsonl`` to ``superseded.jsonl`` with
    ``why``, its config to ``configs/superseded/``, its run folder in ``out`` to ``out/superseded/CELL-lrLR``; the
    cell is then missing and runs again under the protocol. The row stays shown, in no comparison. ValueError (and
    nothing moved) for an empty reason, a cell that is not the grid's or has no row.

    Example: ``python -m zotune.bench.claims set-aside trec-lozo-scan-lr5e-05 --why "ran sequential"``."""
    if not why.strip():
        raise ValueError(f"{name}: say why it is set aside (--why)")
    cell = next((c for c in grid(protocol) if c.name == name), None)
    if cell is None:
        raise ValueError(f"{name}: not a cell of the protocol's grid")
    row = results.rows.get(name)
    if row is None:
        raise ValueError(f"{name}: no row in {results.folder / 'runs.jsonl'} to set aside")
    lr = row.get("lr") if row.get("lr") is not None else (cell.scan_lr if cell.phase == "scan" else None)
    if lr is None:
        raise ValueError(f"{name}: its row records no lr (the set-aside rows are kept by cell and lr)")
    row = {**row, "lr": lr, "why": why.strip()}
    kept, dest = results.config_path(name), results.superseded_config_path(row)
    if not kept.is_file():
        raise ValueError(f"{name}: its config is not kept ({kept} is missing)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(kept, dest)
    results.superseded = [r for r in results.superseded if not (r["cell"] == name and r["lr"] == row["lr"])] + [row]
    results.set_aside([name], [c.name for c in grid(protocol)])
    if out is not None and (out / name).is_dir():
        _move_run_aside(out, name, row["lr"])
    write_picks(protocol, results)
    return row


def write_picks(protocol: Protocol, results: Results) -> None:
    """``RESULTS/lr/TASK-ROW.json`` for every finished scan; a pick whose scan the protocol has since extended (its
    new lrs not run yet) is removed, not left standing."""
    chosen = picks(protocol, results)
    for task in protocol.tasks:
        for row in protocol.rows:
            path = results.folder / "lr" / f"{task}-{row.name}.json"
            pick = chosen.get((task, row.name))
            if pick is None:
                if row.scanned and path.is_file():
                    path.unlink()
                continue
            text = json.dumps(pick, indent=1) + "\n"
            if not path.is_file() or path.read_text() != text:
                atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------------------------------
# one cell (the subprocess)


def run_cell(config: str | Path) -> int:
    """Run (or resume, or leave alone when finished) the cell whose config is ``config``; the exit status.

    Built with :func:`zotune.train.run_config_from_dict` (no jsonargparse). A run folder with a checkpoint resumes
    from it; one without a checkpoint (stopped before its first) starts again; a folder that is not a run folder is
    refused, untouched. 0: finished; 3: stopped by the watchdog (its results written); 128 + signal: stopped by
    SIGINT/SIGTERM (resumable from its last checkpoint); 2: a bad config or folder."""
    import logging

    import yaml

    from ..train import TrainingStopped, run_config_from_dict, train
    from ..train.config import ConfigError

    tree = yaml.safe_load(Path(config).read_text())
    out = Path(tree["out"])
    if (out / "results.json").is_file():
        print(f"{out}: finished already (results.json); nothing to do")
        return 0
    if out.exists() and any(out.iterdir()):
        if not (out / "config.yaml").is_file():
            print(f"error: {out} exists and is not a run folder (no config.yaml): move it away", file=sys.stderr)
            return 2
        if _checkpoint_step(out) is not None:
            tree["resume"] = True
        else:
            tree["overwrite"] = True  # stopped before its first checkpoint: nothing to resume
    logging.basicConfig(level=logging.INFO, format="[zotune] %(message)s")
    try:
        cfg = run_config_from_dict(tree)
        results = train(cfg, argv=["python", "-m", "zotune.bench.claims", "cell", str(config)])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as err:  # SIGINT, or SIGTERM where the loop turns it into a clean stop
        print(f"stopped: {err or 'interrupted'}; the next run resumes it", file=sys.stderr)
        return int(getattr(err, "exit_code", 130))
    print(f"finished: best dev {results['best_dev']:.4f} (step {results['best_step']}), test {results.get('test')}")
    return 0


def check_cell(
    results_dir: str | Path, cell: str, out: str | Path, *, forwards: int = 20, device: str | None = None
) -> dict[str, Any]:
    """Spot-check that a committed row reproduces from its kept config: rerun ``configs/CELL.yaml`` for its first
    ``forwards`` forwards into ``out`` (no test, no checkpoints) and compare the zero-shot dev accuracy and every
    step's loss with the row's curves (stored to 6 decimals).

    On the row's own device the run is deterministic: every loss must agree to 1e-5 (``ok``). On another device the
    directions come from that device's generator, so only the zero-shot dev (exactly) and the first step's loss are
    judged, the latter to 1e-2: it is the mean of ℓ(θ ± εz), which differs from ℓ(θ) by about ε² zᵀHz / 2 and so
    with the direction (3.7e-3 between a CUDA and a CPU draw of LOZO's first step, 2.2e-3 of MeZO-SVRG's, at
    ε = 1e-3); later steps are reported, not judged. "The same device" includes the instruction set where a
    library picks its kernels by it (bitsandbytes' NF4 on CPUs with and without AVX512: 2.8e-4).

    Example: ``python -m zotune.bench.claims check sst2-lozo-m-scan-lr1.25e-05 --forwards 20``
    """
    from ..train import run_config_from_dict, train
    from ..train.plot import read_metrics

    results = Results.load(results_dir)
    if cell not in results.rows:
        raise ValueError(f"{results_dir}: no row {cell!r} in runs.jsonl")
    row, config = results.rows[cell], results.config_path(cell)
    if not config.is_file():
        raise ValueError(f"{config}: the row's config is missing")
    if forwards < 1:
        raise ValueError(f"--forwards {forwards}: must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: the check writes a fresh run there")
    tree = read_yaml(config)
    tree["out"] = str(out)
    big = 10**9
    tree["train"] |= {"max_forwards": forwards, "test": False, "test_at_start": False, "eval_every": big,
                      "checkpoint_every": big, "early_stopping": 0}  # fmt: skip
    ran_on = device or tree["model"].get("device") or "cpu"
    tree["model"]["device"] = ran_on
    train(run_config_from_dict(tree), argv=["python", "-m", "zotune.bench.claims", "check", cell])
    records = read_metrics(out)
    losses = [(r["forwards"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    zero_dev = next((r["accuracy"] for r in records if r.get("kind") == "eval" and r.get("split") == "dev"), None)
    committed = {int(f): v for f, v in row["curves"]["loss"]}
    pairs = [(f, v, committed[f]) for f, v in losses if f in committed]
    if not pairs:
        raise ValueError(f"{cell}: no step of the check matches a logged step of the row (forwards {losses[:3]} ...)")
    same = str(row.get("device", "cpu")).split(":")[0] == str(ran_on).split(":")[0]
    judged = pairs if same else pairs[:1]
    tol = 1e-5 if same else 1e-2
    worst = max(abs(a - b) for _, a, b in judged)
    dev_ok = zero_dev is not None and abs(zero_dev - row["zero_shot_dev"]) < 1e-9
    return {
        "cell": cell, "device": ran_on, "row_device": row.get("device"), "same_device": same,
        "steps_compared": len(pairs), "steps_judged": len(judged), "tolerance": tol, "max_abs_loss_diff": worst,
        "max_abs_loss_diff_all": max(abs(a - b) for _, a, b in pairs), "zero_shot_dev": zero_dev,
        "row_zero_shot_dev": row["zero_shot_dev"], "ok": bool(dev_ok and worst <= tol),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# sample efficiency at fine resolution


def reach_cells(protocol: Protocol, results: Results, rows: Sequence[str] | None = None) -> list[tuple[Cell, float]]:
    """The seed cells of the reach rows on the reach task, each with its picked lr (rows without a pick left out)."""
    chosen = picks(protocol, results)
    wanted = protocol.reach_rows if rows is None else tuple(rows)
    for name in wanted:
        protocol.row(name)  # KeyError naming the rows for an unknown one
    out = []
    for cell in grid(protocol):
        if cell.phase == "seeds" and cell.task == protocol.reach_task and cell.row.name in wanted:
            lr = chosen.get((cell.task, cell.row.name), {}).get("lr")
            if lr is not None:
                out.append((cell, lr))
    return out


def reach_name(cell: Cell, protocol: Protocol) -> str:
    return f"{cell.name}-first{protocol.reach_forwards}"


def reach_tree(
    cell: Cell, protocol: Protocol, *, out: Path, device: str, lr: float, model: str | None = None
) -> dict[str, Any]:
    """The seed cell's config cut to its first ``reach_forwards`` forwards with dev every ``reach_every`` forwards
    (no test, no checkpoints): the same run as the grid's seed cell up to there (the same seed, batches and
    directions; evaluating does not move the run), seen more often."""
    tree = cell_tree(cell, protocol, out=out, device=device, lr=lr, model=model)
    every = max(1, round(protocol.reach_every / (cell.row.fwd_per_step * cell.row.rows)))
    budget = protocol.reach_forwards // cell.row.rows  # steps: a bound (a step is at least one forward)
    tree["train"] |= {"steps": budget, "max_forwards": budget, "eval_every": every, "checkpoint_every": budget + 1,
                      "test": False, "test_at_start": False}  # fmt: skip
    tree["out"] = str(out / reach_name(cell, protocol))
    return tree


def run_reach(
    protocol: Protocol,
    results_dir: str | Path,
    out: str | Path,
    *,
    rows: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    device: str = "cpu",
    model: str | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run the reach rows' seed cells for their first ``reach_forwards`` forwards with dev every ``reach_every``
    (:func:`reach_tree`), one after another in this process, and record each in ``RESULTS/reach.jsonl`` (its
    config in ``RESULTS/configs/reach/``). A run recorded at its row's current pick is skipped; an unfinished run
    folder starts again (the runs keep no checkpoints). Returns the runs recorded.

    Example: ``python -m zotune.bench.claims reach --rows fzoo --seeds 0``"""
    from ..train import run_config_from_dict, train
    from ..train.plot import read_metrics
    from .accuracy import save_config

    results, out = Results.load(results_dir), Path(out) / "reach"
    done = []
    for cell, lr in reach_cells(protocol, results, rows):
        if seeds is not None and cell.seed not in seeds:
            continue
        name = reach_name(cell, protocol)
        old = results.reach.get(name)
        if old is not None and math.isclose(old["lr"], lr, rel_tol=1e-9):
            log(f"{name}: recorded at lr {lr:g}, skipped")
            continue
        tree = reach_tree(cell, protocol, out=out, device=device, lr=lr, model=model)
        run = Path(tree["out"])
        if not (run / "results.json").is_file():
            if run.exists():
                shutil.rmtree(run)
            log(f"{name}: {protocol.reach_forwards} forwards at lr {lr:g}, dev every {tree['train']['eval_every']} "
                "steps")  # fmt: skip
            train(run_config_from_dict(tree), argv=["python", "-m", "zotune.bench.claims", "reach", name])
        records = read_metrics(run)
        env = json.loads((run / "env.json").read_text()) if (run / "env.json").is_file() else {}
        res = json.loads((run / "results.json").read_text())
        losses = {r["forwards"]: r["loss"] for r in records if r.get("kind") == "train" and "loss" in r}
        row = {
            "run": name, "cell": cell.name, "task": cell.task, "row": cell.row.name, "seed": cell.seed, "lr": lr,
            "forwards": res["forwards"] * cell.row.rows, "seconds": res.get("seconds"),
            "device": env.get("device") or device,
            "dev": [[r["forwards"] * cell.row.rows, r["accuracy"]] for r in records
                    if r.get("kind") == "eval" and r.get("split") == "dev"],
            "loss": sorted([f, v] for f, v in losses.items()),
        }  # fmt: skip
        seed_row = results.rows.get(cell.name)  # the grid's run of the same cell: the same losses up to here
        if (seed_row is not None and seed_row.get("device") == row["device"]
                and math.isclose(seed_row.get("lr") or 0.0, lr, rel_tol=1e-9)):  # fmt: skip
            logged = {int(f): v for f, v in seed_row["curves"]["loss"]}
            common = [abs(v - logged[f]) for f, v in losses.items() if f in logged]
            row["grid_loss_diff"] = max(common) if common else None
        save_config(run, results.folder / "configs" / "reach" / f"{name}.yaml")
        results = Results.load(results_dir)  # another process may have added rows since
        results.reach[name] = row
        text = "".join(json.dumps(r) + "\n" for _, r in sorted(results.reach.items()))
        atomic_write_text(results.folder / "reach.jsonl", text)
        done.append(name)
        log(f"{name}: dev {' '.join(f'{f}:{a:.3f}' for f, a in row['dev'])}")
    return done


def mezo_dev_at(protocol: Protocol, results: Results, seed: int) -> tuple[int, float] | None:
    """MeZO's last dev evaluation at or before ``reach_target`` forwards (+ 1: the first step's check forward) on
    the reach task's seed run: (forwards, accuracy)."""
    row = _seeds_rows(protocol, results, protocol.reach_task, "mezo").get(seed)
    points = [(f, a) for f, a in (row or {}).get("curves", {}).get("dev", []) if 0 < f <= protocol.reach_target + 1]
    return max(points) if points else None


def reach_interval(points: Sequence[Sequence[float]], target: float) -> tuple[int, float]:
    """Where dev first reaches ``target`` along ``points`` ([forwards, accuracy], any order): (lo, hi) with the
    reach in (lo, hi]: hi the first evaluation at or above it, lo the one before; (last, inf) when never.

    >>> reach_interval([[0, 0.5], [25, 0.6], [50, 0.7], [75, 0.65]], 0.68)
    (25, 50)
    """
    lo = 0
    for f, acc in sorted(points):
        if acc >= target - 1e-12:
            return lo, f
        lo = f
    return lo, math.inf


def reach_summary(
    protocol: Protocol, results: Results, row: str, chosen: dict[tuple[str, str], dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The row's reach of MeZO's 200-step dev, per seed and on average, and the verdict against a quarter of MeZO's
    forwards. Per seed the fine-resolution run's dev points (its first ``reach_forwards``) are followed by the
    grid's seed run's later ones, where that run exists at the same lr. The mean reach lies in (mean lo, mean hi]:
    *holds* when mean hi ≤ target ÷ 4, *does not hold at this scale* when mean lo ≥ target ÷ 4, else
    *inconclusive (between two evaluations)*. Where the seed run is not done yet, seed 0 takes the lr scan's run at
    the pick instead: the same run (same seed, constant lr) for its first ``scan_budget`` forwards. None when the
    row has no reach run; ``missing`` names what is."""
    pick = (picks(protocol, results) if chosen is None else chosen).get((protocol.reach_task, row), {})
    chosen_lr = pick.get("lr")
    runs = {r["seed"]: r for r in results.reach.values() if r["row"] == row and r["task"] == protocol.reach_task}
    if not runs:
        return None
    grid_rows = _seeds_rows(protocol, results, protocol.reach_task, row)
    per, missing = {}, []
    for s in protocol.seeds:
        run, target = runs.get(s), mezo_dev_at(protocol, results, s)
        if run is None or chosen_lr is None or not math.isclose(run["lr"], chosen_lr, rel_tol=1e-9):
            missing.append(f"s{s}: no run at the pick" if run is None else f"s{s}: ran at {run['lr']:g}, pick now "
                           f"{chosen_lr if chosen_lr is None else format(chosen_lr, 'g')}")  # fmt: skip
            continue
        if target is None:
            missing.append(f"s{s}: MeZO's seed run")
            continue
        points = list(run["dev"])
        later = grid_rows.get(s)
        if later is not None and not math.isclose(later.get("lr") or 0.0, run["lr"], rel_tol=1e-9):
            later = None  # the seed run at another lr is another run
        if later is None and s == protocol.scan_seed:  # the scan at the pick: the seed run's first scan_budget
            scan = Cell(protocol.reach_task, protocol.row(row), "scan", s, run["lr"] / protocol.row(row).hparams[
                protocol.row(row).scale[0]])  # fmt: skip
            later = results.rows.get(scan.name)
        if later is not None:
            k = later.get("rows_per_forward", 1)
            points += [[f * k, a] for f, a in later.get("curves", {}).get("dev", []) if f * k > run["forwards"]]
        lo, hi = reach_interval(points, target[1])
        if lo >= run["forwards"]:  # not reached by the fine run, which stopped where its next step would pass the
            lo = max(lo, protocol.reach_forwards)  # budget: no state up to the budget reached it
        per[s] = {"target": target, "interval": (lo, hi)}
    out: dict[str, Any] = {"row": row, "lr": chosen_lr, "seeds": per}
    if missing:
        out["missing"] = missing
        return out
    lo = statistics.fmean(v["interval"][0] for v in per.values())
    hi = statistics.fmean(v["interval"][1] for v in per.values())
    quarter = protocol.reach_target / 4
    out |= {"mean": (lo, hi), "quarter": quarter}
    out["verdict"] = ("holds" if hi <= quarter else "does not hold at this scale" if lo >= quarter
                      else "inconclusive (between two evaluations)")  # fmt: skip
    return out


def _reach_lines(protocol: Protocol, results: Results, href: str = "reach.jsonl") -> list[str]:
    chosen = picks(protocol, results)
    sums = [x for r in protocol.rows if (x := reach_summary(protocol, results, r.name, chosen)) is not None]
    if not sums:
        return []
    q = protocol.reach_target // 4
    lines = [
        f"Sample efficiency at fine resolution: forwards each packed estimator needs to reach MeZO's dev accuracy "
        f"after {protocol.reach_target // 2} steps ({protocol.reach_target} forwards), same seed; the target is "
        f"≤ {q} (a quarter). Dev every {protocol.reach_every} forwards over the first {protocol.reach_forwards} "
        f"([reach.jsonl]({href}): the seed run's first forwards, rerun), then the grid's seed run's (every "
        f"{protocol.eval_forwards}); a reach in (a, b] lies between two evaluations:",
        "",
        "| method | lr | MeZO's dev per seed | forwards to reach it, per seed | mean | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for x in sums:
        label = protocol.row(x["row"]).label
        mezo = " / ".join(f"{v['target'][1]:.3f}" for v in x["seeds"].values()) or "—"

        def span(iv: tuple[float, float]) -> str:
            if iv[1] == 0:
                return "0 (before training)"
            return f"({iv[0]:.0f}, {iv[1]:.0f}]" if math.isfinite(iv[1]) else f"> {iv[0]:.0f}"

        per = " / ".join(f"s{s} {span(v['interval'])}" for s, v in x["seeds"].items())
        if "missing" in x:
            lines.append(f"| {label} | {x['lr'] or '—'} | {mezo} | {per or '—'} | — | missing: "
                         f"{'; '.join(x['missing'])} |")  # fmt: skip
            continue
        lines.append(f"| {label} | {x['lr']:g} | {mezo} | {per} | {span(x['mean'])} | **{x['verdict']}** |")
    return lines + [""]


# --------------------------------------------------------------------------------------------------------------------
# the driver


@dataclass
class Lane:
    cell: Cell
    proc: subprocess.Popen
    began: float
    log: Path


def _child_env(threads: int) -> dict[str, str]:
    """The cells' environment: this checkout's ``src`` first on PYTHONPATH (no install needed), ``threads`` intra-op
    threads per cell unless set already, unbuffered output for the logs."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _estimate(cell: Cell, status: Status, protocol: Protocol, results: Results, device: str) -> float | None:
    """Seconds the cell still needs: the median rate (seconds per forward) of the finished cells on the same device
    that are most like it: the same row, method and task; else the same row and method on another task; else the
    same row; else the slowest rate of any row there (a cell too long for the time left should not start only to be
    stopped unfinished). The method matters: a row that runs packed on one task and sequential on another has two
    rates. None when nothing has finished on the device."""
    rates: dict[tuple[str, ...], list[float]] = {}
    for r in results.rows.values():
        if r.get("seconds") and str(r.get("device", "")).startswith(device[:3]):
            rate = r["seconds"] / max(1, r["forward_equivalents"])
            row, method = r.get("row", ""), r.get("method", "")
            for key in ((row, method, r.get("task", "")), (row, method), (row,)):
                rates.setdefault(key, []).append(rate)
    if not rates:
        return None
    keys = ((cell.row.name, cell.method, cell.task), (cell.row.name, cell.method), (cell.row.name,))
    found = next((rates[k] for k in keys if k in rates), None)
    rate = statistics.median(found) if found else max(map(max, rates.values()))
    left = budget_of(cell, protocol) - status.forwards_done * cell.row.rows
    return rate * left


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One driver per output folder at a time."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".claims.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(
                f"another `claims run` is using {out} (its lock {out / '.claims.lock'} is held)"
            ) from None
        yield


@contextlib.contextmanager
def _signals_stop(flag: dict[str, Any]) -> Iterator[None]:
    """SIGINT/SIGTERM to the driver: stop launching, stop the running cells cleanly (as at the deadline)."""

    def handler(signum: int, _frame: Any) -> None:
        flag["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _selected(st: Status, only: Sequence[str], phase: str | None) -> bool:
    if phase is not None and st.cell.phase != phase:
        return False
    return not only or any(fnmatch.fnmatchcase(st.cell.name, p) for p in only)


def _priority(st: Status, only: Sequence[str]) -> int:
    """Launch priority: the index of the first ``--only`` glob the cell matches (the globs' order is the order in
    which their cells start; grid order among the cells of one glob)."""
    return next((i for i, p in enumerate(only) if fnmatch.fnmatchcase(st.cell.name, p)), len(only))


def _prune_what(prune: str, cell: Cell) -> str:
    return prune if prune != "auto" else ("all" if cell.phase == "scan" else "checkpoints")


def prune_run(run: Path, what: str) -> None:
    """Delete a finished run's resume checkpoints (``checkpoints``) and also its best weights (``all``)."""
    for name in {"checkpoints": ("checkpoints",), "all": ("checkpoints", "best")}.get(what, ()):
        if (run / name).is_dir() and (run / "results.json").is_file():
            shutil.rmtree(run / name)


def run_grid(
    protocol: Protocol,
    out: str | Path,
    results_dir: str | Path,
    *,
    device: str = "cpu",
    profile: str | None = None,
    lanes: int = 1,
    only: Sequence[str] = (),
    phase: str | None = None,
    deadline: float | None = None,
    grace: float = 60.0,
    prune: str = "auto",
    threads: int | None = None,
    max_failures: int = 3,
    model: str | None = None,
    poll: float = 2.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the pending cells (missing or unfinished; seeds once their lr is picked) as ``lanes`` parallel
    subprocesses; summarize each finished cell into ``results_dir`` as it ends; return what happened (also written
    to ``out/last-run.json``).

    ``deadline`` (seconds from now): no cell starts after it, nor one whose estimated time left (from finished cells
    of its row on this device) exceeds the time left; at the deadline the running cells get SIGTERM (the training
    loop stops them at a step boundary with a checkpoint where it supports that, else the last checkpoint stays) and,
    ``grace`` seconds later, SIGKILL. SIGINT/SIGTERM to the driver do the same at once. After ``max_failures`` cells
    failed (not stopped), no more cells start. ``prune``: what a finished cell keeps (``auto``: scan cells keep no
    weights, the others their best weights; ``none``; ``checkpoints``: drop the resume checkpoints; ``all``)."""
    out, results = Path(out), Results.load(results_dir)
    profile = profile or profile_of(device)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, lanes))
    began, flag = time.monotonic(), {}
    running: dict[str, Lane] = {}
    outcomes: dict[str, str] = {}
    attempted: set[str] = set()
    failures, stopping, no_launch, stop_at, killed = 0, None, None, 0.0, False
    env = _child_env(threads)
    order = [c.name for c in grid(protocol)]
    model_ready, changed = False, True
    with _lock(out), _signals_stop(flag):
        summarize_finished(protocol, out, results, profile, log, prune=prune)
        while True:
            for name, lane in list(running.items()):  # reap the cells that ended
                rc = lane.proc.poll()
                if rc is None:
                    continue
                del running[name]
                outcome, failed = _reap(lane, rc, protocol, out, results, order, prune)
                outcomes[name], failures, changed = outcome, failures + failed, True
                log(f"[{time.monotonic() - began:7.0f} s] {name}: {outcome}")
                for moved in set_aside_unstable(protocol, results, out, busy=list(running)):
                    attempted.discard(moved)
                    log(f"[{time.monotonic() - began:7.0f} s] set aside (stability rule): {moved}")
            now = time.monotonic() - began
            if stopping is None and (flag.get("signal") or (deadline is not None and now >= deadline)):
                stopping = f"{flag['signal']} to the driver" if flag.get("signal") else f"deadline ({deadline:g} s)"
                stop_at = now
                log(f"[{now:7.0f} s] stopping ({stopping}): SIGTERM to {len(running)} running cell(s)")
                for lane in running.values():
                    lane.proc.send_signal(signal.SIGTERM)
            elif stopping is not None and running and not killed and now - stop_at > grace:
                log(f"[{now:7.0f} s] {len(running)} cell(s) still running {grace:g} s after SIGTERM: SIGKILL")
                for lane in running.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(lane.proc.pid, signal.SIGKILL)
                killed = True
            if no_launch is None and failures >= max_failures:
                no_launch = f"{failures} cells failed (see their logs): no more cells start"
                log(f"[{now:7.0f} s] {no_launch}")
            ready: list[Status] = []
            if stopping is None and no_launch is None and changed:
                ready = [
                    st for st in statuses(protocol, out, results, profile)[0]
                    if st.state in ("missing", "unfinished") and st.cell.name not in attempted
                    and st.cell.name not in running and _selected(st, only, phase)
                ]  # fmt: skip
                ready.sort(key=lambda st: _priority(st, only))  # stable: grid order within one glob
                changed = False
                for st in ready:
                    if len(running) >= lanes:
                        changed = True  # the cells left over start when a lane frees up
                        break
                    attempted.add(st.cell.name)
                    est = _estimate(st.cell, st, protocol, results, device)
                    if deadline is not None and est is not None and est > deadline - now:
                        outcomes[st.cell.name] = f"not started: needs ~{est:.0f} s, {deadline - now:.0f} s left"
                        continue
                    if not model_ready:
                        _prepare_model(model or protocol.model, log)
                        model_ready = True
                    lr = picks(protocol, results).get((st.cell.task, st.cell.row.name), {}).get("lr")
                    try:
                        running[st.cell.name] = _launch(st, protocol, out, device, lr, model, env)
                    except ValueError as err:  # a config the protocol cannot build (a bad row): named, not run
                        outcomes[st.cell.name], failures = f"failed: {err}", failures + 1
                        continue
                    log(f"[{now:7.0f} s] started {st.cell.name} ({st.detail or 'fresh'})")
            if not running and not ready:
                break
            time.sleep(poll)
    final, _ = statuses(protocol, out, results, profile)
    counts: dict[str, int] = {}
    for st in final:
        counts[st.state] = counts.get(st.state, 0) + 1
    summary = {
        "seconds": round(time.monotonic() - began, 1),
        "device": device,
        "profile": profile,
        "lanes": lanes,
        "stopped": stopping or no_launch,
        "outcomes": outcomes,
        "counts": counts,
    }
    atomic_write_text(out / "last-run.json", json.dumps(summary, indent=1) + "\n")
    log(format_summary(summary))
    return summary


def profile_of(device: str) -> str:
    """The profile of a device: ``cpu`` for cpu, ``gpu`` for cuda."""
    return {v: k for k, v in PROFILES.items()}.get(device.split(":")[0], "cpu")


def _prepare_model(name: str, log: Callable[[str], None]) -> None:
    """A GGUF model is converted once here, before the lanes start (not by every lane at the same time). A model
    that cannot be resolved is left to the cells, whose logs then say why."""
    from ..models.load import ModelLoadError, convert_gguf, resolve

    try:
        found = resolve(name)
        if found.gguf_path is not None:
            convert_gguf(found)
    except (ModelLoadError, OSError, ValueError) as err:
        log(f"model {name}: {err}")


def _launch(
    st: Status, protocol: Protocol, out: Path, device: str, lr: float | None, model: str | None, env: dict[str, str]
) -> Lane:
    import yaml

    cell = st.cell
    tree = resolved(cell_tree(cell, protocol, out=out, device=device, lr=lr, model=model))
    config = out / "cells" / f"{cell.name}.yaml"
    atomic_write_text(config, yaml.safe_dump(tree, sort_keys=False))
    log_path = out / "logs" / f"{cell.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "zotune.bench.claims", "cell", str(config)]
    with open(log_path, "a") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {st.detail or 'fresh start'}: {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Lane(cell, proc, time.monotonic(), log_path)


def _reap(
    lane: Lane, rc: int, protocol: Protocol, out: Path, results: Results, order: list[str], prune: str
) -> tuple[str, int]:
    """The outcome of an ended cell (and 1 if it failed); a finished one is summarized and pruned."""
    from .accuracy import save_config

    run, took = out / lane.cell.name, time.monotonic() - lane.began
    if (run / "results.json").is_file():
        row = summarize_cell(run, lane.cell)
        results.rows[lane.cell.name] = row
        save_config(run, results.config_path(lane.cell.name))
        results.save(order)
        write_picks(protocol, results)
        prune_run(run, _prune_what(prune, lane.cell))
        return f"finished in {took:.0f} s: {_done_detail(row)}", 0
    step = _checkpoint_step(run) if run.is_dir() else None
    where = f"resumable from step {step}" if step is not None else "no checkpoint yet"
    if rc in (130, 143, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL):
        return f"stopped after {took:.0f} s ({where})", 0
    return f"failed (exit {rc}) after {took:.0f} s, {where}: see {lane.log}", 1


def format_summary(summary: dict[str, Any]) -> str:
    stopped = f"; stopped: {summary['stopped']}" if summary["stopped"] else ""
    head = f"claims run: {summary['seconds']:.0f} s on {summary['device']} ({summary['profile']} profile)"
    lines = [f"{head}, {summary['lanes']} lane(s){stopped}"]
    lines += [f"  {name}: {what}" for name, what in summary["outcomes"].items()]
    lines.append("  grid now: " + ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items())))
    return "\n".join(lines)


def cell_time_left(sts: Sequence[Status], protocol: Protocol, results: Results, device: str) -> dict[str, float]:
    """Seconds of cell time the unfinished cells still need on ``device``, by phase, at the measured rates of the
    finished cells there (:func:`_estimate`); divide by the lanes for wall-clock. Empty when nothing finished there.

    >>> cell_time_left([], PROTOCOL, Results(Path("no-results")), "cpu")
    {}
    """
    left: dict[str, float] = {}
    for st in sts:
        if st.state in ("missing", "unfinished", "waiting"):
            est = _estimate(st.cell, st, protocol, results, device)
            if est is None:
                return {}
            left[st.cell.phase] = left.get(st.cell.phase, 0.0) + est
    return left


def format_plan(
    sts: Sequence[Status],
    chosen: dict[tuple[str, str], dict[str, Any]],
    protocol: Protocol,
    results: Results | None = None,
) -> str:
    lines = [f"{'cell':36} {'phase':6} {'lr':>9} {'seed':>4} {'forwards':>8}  {'status':11} detail"]
    left = 0
    for st in sts:
        c = st.cell
        if c.phase == "scan":
            lr = f"{c.scan_lr:.3g}"
        elif c.phase == "seeds":
            picked = chosen.get((c.task, c.row.name), {}).get("lr")
            lr = "(scan)" if (c.task, c.row.name) not in chosen else "(none)" if picked is None else f"{picked:.3g}"
        else:
            lr = f"{c.row.hparams[c.row.scale[0]]:.3g}"
        budget = budget_of(c, protocol)
        if st.state in ("missing", "unfinished", "waiting"):
            left += budget - st.forwards_done * c.row.rows
        lines.append(f"{c.name:36} {c.phase:6} {lr:>9} {c.seed:>4} {budget:>8}  {st.state:11} {st.detail}")
    counts: dict[str, int] = {}
    for st in sts:
        counts[st.state] = counts.get(st.state, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; {left:,} forwards to run")
    for device in ("cpu", "cuda") if results is not None else ():
        # a row with no finished cell on the device is charged the slowest measured rate there
        if times := cell_time_left(sts, protocol, results, device):
            parts = ", ".join(f"{phase} {sec / 3600:.1f} h" for phase, sec in sorted(times.items()))
            lines.append(
                f"cell time left on {device} at its measured rates: {sum(times.values()) / 3600:.1f} h ({parts}); "
                "÷ lanes for wall-clock"
            )
    for (task, row), p in sorted(chosen.items()):
        notes = [
            " on the grid's edge" if p["edge"] else "",
            "" if p["beats_zero_shot"] or p["lr"] is None else ", no lr beat zero-shot dev",
            f", diverged in a seed run at {_lrs(p)} (stability rule)" if p.get("unstable") else "",
        ]
        devs = " ".join(f"{q['lr']:.3g}:{q['best_dev']:.3f}" for q in p["grid"])
        lr = "none" if p["lr"] is None else f"{p['lr']:.3g}"
        lines.append(f"lr pick {task}-{row}: {lr}{''.join(notes)} (best dev by lr: {devs})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# pack / unpack (a results burst on another machine)

RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl", "results.json", "updates.jsonl")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
_MEMBER = re.compile(
    rf"^(runs/{_NAME}/({'|'.join(re.escape(f) for f in RUN_FILES)})|cells/{_NAME}\.yaml|logs/{_NAME}\.(log|json))$"
)


def pack(out: str | Path, dest: str | Path) -> dict[str, Any]:
    """One tarball (gzip) of the finished cells of ``out`` without weights or checkpoints (``RUN_FILES``), with their
    cell configs and every cell's log; returns what went in."""
    out, dest = Path(out), Path(dest)
    finished = (
        sorted(p for p in out.iterdir() if p.is_dir() and (p / "results.json").is_file()) if out.is_dir() else []
    )
    if not finished:
        raise ValueError(f"{out}: no finished cell (a folder with results.json) to pack")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for run in finished:
            for name in RUN_FILES:
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"runs/{run.name}/{name}", recursive=False)
            cfg = out / "cells" / f"{run.name}.yaml"
            if cfg.is_file():
                tar.add(cfg, arcname=f"cells/{run.name}.yaml", recursive=False)
        for log_file in sorted((out / "logs").glob("*.log")) if (out / "logs").is_dir() else []:
            tar.add(log_file, arcname=f"logs/{log_file.name}", recursive=False)
        if (out / "last-run.json").is_file():  # what the last `run` did: finished, stopped, failed, not started
            tar.add(out / "last-run.json", arcname="logs/last-run.json", recursive=False)
    os.replace(tmp, dest)
    return {"tarball": str(dest), "cells": [p.name for p in finished], "bytes": dest.stat().st_size}


def unpack(
    tarball: str | Path, out: str | Path, results_dir: str | Path, protocol: Protocol = PROTOCOL,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Unpack a :func:`pack` tarball into ``out`` and summarize its finished cells into ``results_dir``.

    Every member is checked first (plain files with the names :func:`pack` writes; anything else refuses the whole
    tarball, nothing extracted). A cell already in ``out`` is kept as it is (named); logs go to
    ``out/logs/unpacked/``."""
    out, tarball = Path(out), Path(tarball)
    with tarfile.open(tarball, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            if not m.isfile() or not _MEMBER.match(m.name):
                raise ValueError(f"{tarball}: unexpected member {m.name!r} (not a file a claims pack writes)")
        runs = sorted({m.name.split("/")[1] for m in members if m.name.startswith("runs/")})
        kept = [r for r in runs if (out / r).exists()]
        taken = [r for r in runs if r not in kept]
        staging = out / ".unpacking"
        shutil.rmtree(staging, ignore_errors=True)  # a previous unpack that stopped midway
        for m in members:
            parts = m.name.split("/")
            if parts[0] == "runs" and parts[1] not in taken:
                continue
            if parts[0] == "cells" and (out / "cells" / parts[1]).exists():
                continue
            # runs are assembled aside and moved into place whole: a run folder is never half there
            dest = {"runs": staging / m.name, "logs": out / "logs" / "unpacked" / parts[-1]}.get(
                parts[0], out / m.name
            )
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            atomic_write_bytes(dest, src.read())
        for r in taken:
            os.replace(staging / "runs" / r, out / r)
        shutil.rmtree(staging, ignore_errors=True)
    for r in kept:
        log(f"kept the local {out / r} (the packed copy of {r} was not unpacked: move the local one away to take it)")
    added = summarize_finished(protocol, out, Results.load(results_dir), log=log)
    return {"unpacked": taken, "kept_local": kept, "summarized": added}


# --------------------------------------------------------------------------------------------------------------------
# the claims table


def verdict(values: Sequence[float]) -> tuple[str, float, float]:
    """The verdict on a claim from its per-seed values x_s (positive where the claim holds on seed s; see
    :class:`Comparison`), with their mean and sample standard deviation (n − 1).

    * *holds*: mean > std (the claim's side by more than the seed spread), or x_s > 0 on every seed;
    * *does not hold at this scale*: mean < −std, or x_s < 0 on every seed;
    * *inconclusive (spread larger than the difference)*: otherwise.

    With 3 seeds, mean > std is a paired t statistic above √3 ≈ 1.73 (one-sided p ≈ 0.11 under normality) and the
    same sign on all three seeds has one-sided p = 0.125 under a symmetric null: a rule for the spread of this grid,
    not a significance test. The sign rule keeps a skewed x (every seed on one side, one far out) from reading as
    inconclusive.
    """
    if len(values) < 2:
        raise ValueError("a verdict needs at least 2 seeds")
    m, s = statistics.fmean(values), statistics.stdev(values)
    if m > s or all(v > 0 for v in values):
        return "holds", m, s
    if m < -s or all(v < 0 for v in values):
        return "does not hold at this scale", m, s
    return "inconclusive (spread larger than the difference)", m, s


def _seeds_rows(protocol: Protocol, results: Results, task: str, row: str) -> dict[int, dict[str, Any]]:
    """The finished seed (or reference) rows of (task, row), by seed."""
    out = {}
    for r in results.rows.values():
        if r.get("task") == task and r.get("row") == row and r.get("phase") in ("seeds", "refs"):
            out[r["seed"]] = r
    return {s: out[s] for s in protocol.seeds if s in out}


def first_reach(row: dict[str, Any], target: float) -> tuple[int, float | None] | None:
    """(forward equivalents, training seconds) at the first dev evaluation ≥ ``target``; None: never reached."""
    k = row.get("rows_per_forward", 1)
    curves = row.get("curves", {})
    seconds = dict((f, s) for f, s in curves.get("dev_seconds", []))
    for f, acc in curves.get("dev", []):
        if acc is not None and acc >= target - 1e-12:
            return f * k, seconds.get(f)
    return None


def _mean_sd(values: Sequence[float], digits: int = 3, signed: bool = False) -> str:
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} ± {sd:.{digits}f}"


def _best_zo(protocol: Protocol, results: Results, task: str) -> str | None:
    full = {
        r.name: statistics.fmean(x["test"] for x in rows.values())
        for r in protocol.rows
        if r.kind == "zo"
        and r.runs_on(task)
        and len(rows := _seeds_rows(protocol, results, task, r.name)) == len(protocol.seeds)
    }
    return max(full, key=full.get) if full else None


def check_results(protocol: Protocol, results: Results) -> None:
    """Refuse results the table cannot use: a row without its kept config, or whose config differs from the
    protocol (named, with the key). ValueError with one line per problem; nothing is written."""
    cells = {c.name: c for c in grid(protocol)}
    chosen = picks(protocol, results)
    problems = []
    for name in results.rows:
        cell = cells.get(name)
        if cell is None:
            problems.append(f"{name}: not a cell of the protocol's grid")
            continue
        kept = results.config_path(name)
        if not kept.is_file():
            problems.append(f"{name}: its config is not kept ({kept} is missing)")
            continue
        lr = chosen.get((cell.task, cell.row.name), {}).get("lr")
        diff = check_cell_config(cell, protocol, read_yaml(kept), lr)
        if diff:
            problems.append(f"{name}: config differs from the protocol: {'; '.join(diff)}")
    for name in results.reach:
        if not (results.folder / "configs" / "reach" / f"{name}.yaml").is_file():
            problems.append(f"{name} (reach): its config is not kept (configs/reach/{name}.yaml is missing)")
    for row in results.superseded:
        if not results.superseded_config_path(row).is_file():
            problems.append(f"{row['cell']} (set aside): its config is not kept "
                            f"({results.superseded_config_path(row)} is missing)")  # fmt: skip
    if problems:
        raise ValueError("; ".join(problems))


def load_why(results: Results, protocol: Protocol) -> dict[str, str]:
    """``RESULTS/why.yaml``: ``"<comparison id>/<task>": one sentence``. An unknown key is an error (a typo would
    otherwise drop a sentence)."""
    import yaml

    path = results.folder / "why.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of '<comparison id>/<task>': text")
    valid = {f"{c.id}/{t}" for c in protocol.comparisons for t in protocol.tasks}
    for key in data:
        if key not in valid:
            raise ValueError(f"{path}: unknown key {key!r} (keys are '<id>/<task>', e.g. '1a/sst2'; ids: "
                             f"{', '.join(c.id for c in protocol.comparisons)})")  # fmt: skip
    return {k: str(v) for k, v in data.items()}


def compare(comp: Comparison, protocol: Protocol, results: Results, task: str) -> dict[str, Any]:
    """One comparison on one task: the two sides' values, the per-seed x_s and the verdict (or why there is none)."""
    a_name = _best_zo(protocol, results, task) if comp.a == BEST_ZO else comp.a
    b_name = _best_zo(protocol, results, task) if comp.b == BEST_ZO else comp.b
    out: dict[str, Any] = {"a": a_name, "b": b_name}
    names = {r.name for r in protocol.rows}
    if a_name is None or b_name is None:
        out["missing"] = "no pure-ZO row has all its seeds yet"
        return out
    if a_name not in names or b_name not in names:
        out["missing"] = "not in this grid"
        return out
    a, b = _seeds_rows(protocol, results, task, a_name), _seeds_rows(protocol, results, task, b_name)
    n = len(protocol.seeds)
    if len(a) < n or len(b) < n:
        out["missing"] = f"missing: {a_name} {len(a)} of {n} seeds, {b_name} {len(b)} of {n}"
        return out
    seeds = protocol.seeds
    if comp.measure == "test":
        va, vb = [a[s]["test"] for s in seeds], [b[s]["test"] for s in seeds]
        x = [p - q + comp.margin for p, q in zip(va, vb, strict=True)]
        out["shown"] = (
            _mean_sd(va),
            _mean_sd(vb),
            _mean_sd([p - q for p, q in zip(va, vb, strict=True)], signed=True),
        )
    elif comp.measure == "reach":
        need, mine, censored = [], [], 0
        for s in seeds:
            m = first_reach(b[s], b[s]["best_dev"])
            need.append(m[0] if m else 0)
            got = first_reach(a[s], b[s]["best_dev"])
            if got is None:
                censored += 1
            # never reached: counted at its full budget, also when the run stopped early (the watchdog)
            mine.append(got[0] if got else max(a[s]["forward_equivalents"], a[s].get("budget") or protocol.budget))
        if any(v == 0 for v in need):
            out["missing"] = f"inconclusive: {b_name}'s best dev is its step-0 dev on some seed"
            return out
        x = [comp.margin - f / m for f, m in zip(mine, need, strict=True)]
        ratios = [f / m for f, m in zip(mine, need, strict=True)]
        note = f" ({censored} not reached: counted at the budget)" if censored else ""
        out["shown"] = (f"{statistics.fmean(mine):.0f} forwards{note}", f"{statistics.fmean(need):.0f} forwards",
                        f"ratio {_mean_sd(ratios, 2)}")  # fmt: skip
    else:
        key = "median_step_seconds" if comp.measure == "step" else "peak_mem_mb"
        devices = {r.get("device") for r in [*a.values(), *b.values()]}
        if len(devices) > 1:
            out["missing"] = f"not comparable: ran on different devices ({', '.join(sorted(map(str, devices)))})"
            return out
        va, vb = [a[s][key] for s in seeds], [b[s][key] for s in seeds]
        if any(v is None or v <= 0 for v in vb):
            out["missing"] = f"{b_name} has no {key}"
            return out
        x = [1 - p / q for p, q in zip(va, vb, strict=True)]
        unit = "s/step" if comp.measure == "step" else "MiB"
        digits = 3 if comp.measure == "step" else 0
        out["shown"] = (f"{_mean_sd(va, digits)} {unit}", f"{_mean_sd(vb, digits)} {unit}",
                        f"ratio {_mean_sd([p / q for p, q in zip(va, vb, strict=True)], 2)}")  # fmt: skip
    out["x"] = x
    out["verdict"], out["mean"], out["sd"] = verdict(x)
    return out


def methods_table(protocol: Protocol, results: Results, task: str, chosen: dict) -> list[str]:
    """Per method: its lr, test mean ± std and per seed, best dev, forwards and seconds to MeZO's peak dev."""
    mezo = _seeds_rows(protocol, results, task, "mezo")
    n = len(protocol.seeds)
    anyrow = next((r for r in results.rows.values() if r.get("task") == task and r.get("test_n")), None)
    zs = f"zero-shot test {anyrow['zero_shot_test']:.3f}, " if anyrow and anyrow.get("zero_shot_test") else ""
    test_n = anyrow.get("test_n") if anyrow else f"{protocol.tasks[task].get('n_test', '?')}, planned"
    lines = [
        f"#### {task} (test n = {test_n}; {zs}seeds {', '.join(map(str, protocol.seeds))})",
        "",
        "| method | path | lr | test, mean ± std | per seed | best dev, mean | forwards to MeZO's peak dev | "
        "seconds to MeZO's peak dev | s/step (median) | peak MiB | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (r for r in protocol.rows if r.runs_on(task)):
        rows = _seeds_rows(protocol, results, task, row.name)
        if row.scanned:
            p = chosen.get((task, row.name))
            if p is None:
                lr = "scan unfinished"
            elif p["lr"] is None:
                lr = f"none stable (diverged at {_lrs(p)})"
            else:
                lr = f"{p['lr']:.3g}" + (" (grid edge)" if p["edge"] else "")
                lr += f" (diverged at {_lrs(p)})" if p.get("unstable") else ""
        else:
            lr = f"{row.hparams[row.scale[0]]:.3g}"
        per = " / ".join(f"{rows[s]['test']:.3f}" if s in rows else "missing" for s in protocol.seeds)
        if not rows:
            lines.append(f"| {row.label} | {row.path_on(task)} | {lr} | missing (0 of {n} seeds) | "
                         "— | — | — | — | — | — | — |")  # fmt: skip
            continue
        done = len(rows) == n
        test = _mean_sd([r["test"] for r in rows.values()]) if done else f"missing ({len(rows)} of {n} seeds)"
        dev = f"{statistics.fmean(r['best_dev'] for r in rows.values()):.3f}" if done else "—"
        reach_f, reach_s = "—", "—"
        if done and len(mezo) == n:
            hits = [first_reach(rows[s], mezo[s]["best_dev"]) for s in protocol.seeds]
            if all(h is not None for h in hits):
                reach_f = f"{statistics.fmean(h[0] for h in hits):.0f}"
                secs = [h[1] for h in hits]
                reach_s = f"{statistics.fmean(secs):.0f}" if all(v is not None for v in secs) else "—"
            else:
                reached = sum(h is not None for h in hits)
                reach_f = reach_s = f"not reached ({reached} of {n})"
        steps = [r["median_step_seconds"] for r in rows.values() if r.get("median_step_seconds")]
        step = f"{statistics.median(steps):.3f}" if steps and done else "—"
        peak = f"{max(r.get('peak_mem_mb') or 0 for r in rows.values()):.0f}" if done else "—"
        on = {str(r.get("device")) for r in rows.values()}
        devices = next(iter(on))
        if len(on) > 1:  # seconds and memory do not compare across devices: none shown, each seed's device named
            step = peak = "— (mixed devices)"
            reach_s = "—" if reach_s[:1].isdigit() else reach_s
            devices = ", ".join(f"s{s}: {rows[s].get('device')}" for s in protocol.seeds if s in rows)
        lines.append(f"| {row.label} | {row.path_on(task)} | {lr} | {test} | {per} | {dev} | {reach_f} | {reach_s} | "
                     f"{step} | {peak} | {devices} |")  # fmt: skip
    return lines + [""]


def claims_section(protocol: Protocol, results: Results, base: str | Path, *, level: int = 2) -> list[str]:
    """The claims section of the results page, as markdown lines, its links relative to the folder ``base`` of the
    page. Refuses (ValueError) rows without their config or off the protocol (:func:`check_results`) and an unknown
    key in ``why.yaml``."""
    check_results(protocol, results)
    why = load_why(results, protocol)
    chosen = picks(protocol, results)
    root = Path(__file__).resolve().parents[3]

    def link(p: Path) -> str:
        return os.path.relpath(
            (root / p if str(p).startswith("benchmarks/README") else p).resolve(), Path(base).resolve()
        )

    h = "#" * level
    seeds = ", ".join(map(str, protocol.seeds))
    lines = [
        f"{h} Do the papers' claims hold? (SmolLM2-135M, seeds {seeds})",
        "",
        f"Protocol: [benchmarks/README.md, Claims grid: protocol]({link(Path('benchmarks/README.md'))}"
        "#claims-grid-protocol) (written before the runs). Rows: "
        f"[runs.jsonl]({link(results.folder / 'runs.jsonl')}), each with its config in "
        f"[configs/]({link(results.folder / 'configs')}); lr picks in [lr/]({link(results.folder / 'lr')}). "
        f"Test accuracy of the best-on-dev weights; budget {protocol.budget} forwards of batch {protocol.batch_size} "
        f"per ZO run (rows evaluated ÷ {protocol.batch_size}), FO references {protocol.ref_budget} forward + "
        f"backward passes. The data are the same for every seed (data seed 0): seeds vary the ZO directions and "
        "initialisations only, and comparisons are paired by seed.",
        "",
        "Verdict rule: per seed s a value x_s that is positive where the claim holds (a test-accuracy difference, "
        "plus the margin for 'within m points'; for compute, 0.6 − forwards ratio; for step time and memory, "
        "1 − ratio); *holds* when mean(x) > std(x) or x > 0 on every seed, *does not hold at this scale* when "
        "mean(x) < −std(x) or x < 0 on every seed, else *inconclusive (spread larger than the difference)*; std "
        "over seeds with n − 1. A claim with a seed missing gets no verdict.",
        "",
        f"{h}# Methods",
        "",
    ]
    for task in protocol.tasks:
        lines += methods_table(protocol, results, task, chosen)
        fig = results.folder / f"curves-{task}.png"
        if fig.is_file():
            lines += [f"Dev accuracy of every seed against forwards and against wall-clock: "
                      f"[curves-{task}.png]({link(fig)})", ""]  # fmt: skip
    lines += [f"{h}# Claims", ""]
    by_name = {r.name: r for r in protocol.rows}
    for claim in sorted({c.claim for c in protocol.comparisons}, key=lambda c: (c == 0, c)):
        comps = [c for c in protocol.comparisons if c.claim == claim]
        title = CLAIMS.get(claim, f"claim {claim}")
        lines += [f"**{claim}. {title}**" if claim else f"**{title}**", ""]
        lines += ["| id | task | comparison | A | B | A − B (or ratio) | mean(x) ± std(x) | verdict | why |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for comp in comps:
            for task in protocol.tasks:
                if any(n in by_name and not by_name[n].runs_on(task) for n in (comp.a, comp.b)):
                    continue  # a row the protocol runs on other tasks only
                res = compare(comp, protocol, results, task)
                text = comp.text
                if comp.a == BEST_ZO or comp.b == BEST_ZO:
                    text += f" [{res['a'] or '?'} vs {res['b'] or '?'}]"
                reason = why.get(f"{comp.id}/{task}", "—")
                if "missing" in res:
                    lines.append(f"| {comp.id} | {task} | {text} | — | — | — | — | {res['missing']} | {reason} |")
                    continue
                a, b, d = res["shown"]
                lines.append(f"| {comp.id} | {task} | {text} | {a} | {b} | {d} | {res['mean']:+.3f} ± {res['sd']:.3f} "
                             f"| **{res['verdict']}** | {reason} |")  # fmt: skip
        lines.append("")
    lines += _fo_gap_lines(protocol, results) + _reach_lines(protocol, results, link(results.folder / "reach.jsonl"))
    lines += _scan_lines(protocol, chosen)
    return lines + _superseded_lines(results)


def _superseded_lines(results: Results) -> list[str]:
    """The runs set aside (by the stability rule, or by hand with a reason): kept, shown, and left out of every
    comparison."""
    if not results.superseded:
        return []
    lines = [
        "Runs set aside (left out of every comparison; each cell runs again under the protocol). Stability rule: "
        "the watchdog stopped a seed run of the row at this lr or a smaller one, and the row's seeds run again at "
        "the next pick below:",
        "",
        "| cell | lr | best dev | test | forwards | stopped | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results.superseded, key=lambda r: (r["cell"], r["lr"])):
        test = f"{r['test']:.3f}" if r.get("test") is not None else "—"
        lines.append(f"| {r['cell']} | {r['lr']:.3g} | {r['best_dev']:.3f} | {test} | {r.get('forwards', '—')} | "
                     f"{r.get('stopped') or '—'} | {r.get('why') or 'stability rule'} |")  # fmt: skip
    return lines + [""]


def _fo_gap_lines(protocol: Protocol, results: Results) -> list[str]:
    """The best pure-ZO row against FO full per task, every seed, and against the committed FO full number."""
    lines = []
    for task, committed in protocol.fo_full_committed.items():
        if task not in protocol.tasks:
            continue
        best = _best_zo(protocol, results, task)
        fo = _seeds_rows(protocol, results, task, "fo-full")
        if best is None or len(fo) < len(protocol.seeds):
            lines += [f"Best pure-ZO method vs FO full on {task}: missing (not every seed has run).", ""]
            continue
        zo = _seeds_rows(protocol, results, task, best)
        gaps = [fo[s]["test"] - zo[s]["test"] for s in protocol.seeds]
        per = ", ".join(f"s{s} {zo[s]['test']:.3f} vs {fo[s]['test']:.3f}" for s in protocol.seeds)
        zo_mean = statistics.fmean(zo[s]["test"] for s in protocol.seeds)
        test = _mean_sd([zo[s]["test"] for s in protocol.seeds])
        lines += [
            f"Best pure-ZO method on {task}: **{protocol.row(best).label}**, test {test}; gap to FO full of this "
            f"grid {_mean_sd(gaps)} ({per}); gap to the committed FO full {committed:.3f}: "
            f"{committed - zo_mean:.3f} (target ≤ 0.03).",
            "",
        ]
    return lines


def _scan_lines(protocol: Protocol, chosen: dict) -> list[str]:
    if not chosen:
        return []

    def grid_text(factors: Sequence[float]) -> str:
        return "{" + ", ".join(f"{f:g}" for f in factors) + "}"

    own = [f"{t}: × {grid_text(f)}" for t, f in protocol.task_factors.items() if t in protocol.tasks]
    factors = grid_text(protocol.scan_factors) + (f" ({'; '.join(own)})" if own else "")
    lines = [
        f"LR scans (seed {protocol.scan_seed}, {protocol.scan_budget} forwards, lr × {factors}; best dev per lr; "
        "the pick is bold):",
        "",
        "| task | method | best dev by lr | note |",
        "|---|---|---|---|",
    ]
    for (task, row), p in sorted(
        chosen.items(),
        key=lambda kv: (list(protocol.tasks).index(kv[0][0]), [r.name for r in protocol.rows].index(kv[0][1])),
    ):
        cells = " · ".join((f"**{q['lr']:.3g}: {q['best_dev']:.3f}**" if q["lr"] == p["lr"]
                            else f"{q['lr']:.3g}: {q['best_dev']:.3f}") for q in p["grid"])  # fmt: skip
        notes = []
        # only the factors the task's own grid lacks extend it (an extension may already lie in another task's grid)
        added = sorted(set(protocol.row(row).extra_factors) - set(protocol.task_grid(task)))
        if added:
            extra = ", ".join(f"{f:g}" for f in added)
            notes.append(f"grid extended by × {{{extra}}} after a pick on its edge")
        if p["edge"]:
            notes.append("pick on the grid's edge: the best lr may lie outside it")
        if p.get("unstable"):
            notes.append(f"diverged in a seed run at {_lrs(p)}: the pick is the best lr below (stability rule)")
        if p["lr"] is not None and not p["beats_zero_shot"]:
            notes.append(f"no lr beat zero-shot dev ({p['zero_shot_dev']:.3f})")
        lines.append(f"| {task} | {protocol.row(row).label} | {cells} | {'; '.join(notes) or '—'} |")
    return lines + [""]


def plot_seeds(protocol: Protocol, results: Results) -> list[Path]:
    """``RESULTS/curves-<task>.png`` per task with seed rows: dev accuracy of every seed (thin) and the mean over the
    seeds where all have a point (thick) against forwards (rows evaluated ÷ batch size; left) and against the run's
    wall-clock seconds (right; each method's device in its label, since seconds compare only within a device).
    Needs matplotlib (the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.plot import save_png

    written = []
    for task in protocol.tasks:
        rows = {r.name: _seeds_rows(protocol, results, task, r.name) for r in protocol.rows}
        rows = {k: v for k, v in rows.items() if v}
        if not rows:
            continue
        fig, (ax_f, ax_s) = plt.subplots(1, 2, figsize=(13, 5))
        for i, (name, by_seed) in enumerate(rows.items()):
            colour = f"C{i % 10}"
            devices = sorted({str(r.get("device", "?")).split(":")[0] for r in by_seed.values()})
            devs = [dict(map(tuple, r["curves"]["dev"])) for r in by_seed.values()]  # forwards → dev accuracy
            for r, dev in zip(by_seed.values(), devs, strict=True):
                secs = dict(map(tuple, r["curves"].get("dev_seconds", [])))
                ax_f.plot(list(dev), list(dev.values()), color=colour, lw=0.6, alpha=0.45)
                pts = [(secs[f], a) for f, a in dev.items() if f in secs]
                ax_s.plot([t for t, _ in pts], [a for _, a in pts], color=colour, lw=0.6, alpha=0.45)
            xs = sorted(set.intersection(*(set(d) for d in devs)))
            mean = [statistics.fmean(d[f] for d in devs) for f in xs]
            label = f"{protocol.row(name).label} ({len(by_seed)} seed{'s' * (len(by_seed) > 1)}, {'/'.join(devices)})"
            ax_f.plot(xs, mean, color=colour, lw=2, marker="o", ms=3, label=label)
        ax_f.set(xlabel=f"forwards (rows evaluated ÷ {protocol.batch_size})", ylabel="dev accuracy",
                 title=f"{task}: dev accuracy per seed (thin) and mean (thick)")  # fmt: skip
        ax_s.set(xlabel="training seconds (device in the legend)", ylabel="dev accuracy",
                 title=f"{task}: dev accuracy against wall-clock")  # fmt: skip
        ax_f.legend(fontsize=7)
        fig.tight_layout()
        written.append(save_png(fig, results.folder / f"curves-{task}.png", dpi=100))
        plt.close(fig)
    return written


def table(results_dir: str | Path, protocol: Protocol = PROTOCOL) -> str:
    """The claims section (``RESULTS/claims.md``, links relative to it) and its figures (:func:`plot_seeds`);
    ValueError on bad results."""
    results = Results.load(results_dir)
    if not results.rows:
        raise ValueError(f"{results_dir}: no rows (runs.jsonl) to make a table of")
    plot_seeds(protocol, results)
    text = "\n".join(claims_section(protocol, results, results_dir)) + "\n"
    atomic_write_text(Path(results_dir) / "claims.md", text)
    return text


# --------------------------------------------------------------------------------------------------------------------
# smoke: the whole path at toy size


def smoke_protocol(forwards: int = 20, row: str = "mezo", task: str = "sst2") -> Protocol:
    """The protocol's path at toy size, to check a machine before a burst: one row, a one-lr scan and seed 0 at
    ``forwards`` forwards each, dev every ``forwards // 2``, 50 dev and 100 test sentences. Not a result."""
    data = {**TASKS[task], **({"n_dev": 50, "n_test": 100} if TASKS[task]["protocol"] == "mezo" else {"n_test": 100})}
    return Protocol(
        tasks={task: data},
        rows=(replace(PROTOCOL.row(row), extra_factors=()),),
        comparisons=(),
        seeds=(0,),
        scan_factors=(1.0,),
        task_factors={},
        budget=forwards,
        scan_budget=forwards,
        eval_forwards=max(1, forwards // 2),
    )


# --------------------------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cell"]:
        if len(argv) != 2:
            print("usage: python -m zotune.bench.claims cell CONFIG.yaml", file=sys.stderr)
            return 2
        return run_cell(argv[1])
    p = argparse.ArgumentParser(prog="python -m zotune.bench.claims", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="runs/claims", help="folder of the cells' run folders (default runs/claims)")
    common.add_argument("--results", default="benchmarks/results/claims-smollm2", help="runs.jsonl, configs/, lr/")
    grid_opts = argparse.ArgumentParser(add_help=False)
    grid_opts.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    grid_opts.add_argument("--profile", choices=sorted(PROFILES), help="which rows (default: from --device)")
    grid_opts.add_argument(
        "--only", action="append", default=[],
        help="cells matching this glob (repeatable; cells start in the order of the globs)",
    )  # fmt: skip
    grid_opts.add_argument("--phase", choices=("scan", "seeds", "refs"))
    sub.add_parser("plan", parents=[common, grid_opts], help="every cell and its status")
    r = sub.add_parser("run", parents=[common, grid_opts], help="run the pending cells")
    r.add_argument("--lanes", type=int, default=1, help="cells at a time (default 1)")
    r.add_argument("--deadline-seconds", type=float, help="start nothing after this; stop running cells at it")
    r.add_argument("--grace", type=float, default=60.0, help="seconds between SIGTERM and SIGKILL (default 60)")
    r.add_argument("--prune", choices=("auto", "none", "checkpoints", "all"), default="auto")
    r.add_argument("--threads", type=int, help="intra-op threads per cell (default: CPU cores ÷ lanes)")
    r.add_argument("--max-failures", type=int, default=3)
    r.add_argument("--model", help="the model's name or path (e.g. the GGUF file carried to another machine)")
    sub.add_parser("summarize", parents=[common], help="summarize finished cells into --results")
    pk = sub.add_parser("pack", parents=[common], help="tarball of the finished cells (no weights)")
    pk.add_argument("tarball")
    up = sub.add_parser("unpack", parents=[common], help="unpack a tarball into --out and summarize it")
    up.add_argument("tarball")
    sub.add_parser("table", parents=[common], help="the claims section: RESULTS/claims.md")
    rc = sub.add_parser("reach", parents=[common], help="the packed rows' first forwards, dev at fine resolution")
    rc.add_argument("--rows", help="comma-separated rows (default: the protocol's reach rows)")
    rc.add_argument("--seeds", help="comma-separated seeds (default: the protocol's)")
    rc.add_argument("--device", default="cpu")
    rc.add_argument("--model", help="the model's name or path")
    sa = sub.add_parser("set-aside", parents=[common], help="set a finished cell's row aside, with the reason")
    sa.add_argument("cell")
    sa.add_argument("--why", required=True, help="why (shown in the table's set-aside list)")
    ck = sub.add_parser("check", parents=[common], help="rerun a committed row's first forwards from its config")
    ck.add_argument("cell")
    ck.add_argument("--forwards", type=int, default=20)
    ck.add_argument("--device", help="where to run (default: the config's device)")
    ck.add_argument("--into", help="the check's run folder (default: a new temporary folder)")
    ck.add_argument("--record", action="store_true", help="append the outcome to RESULTS/checks.jsonl")
    sm = sub.add_parser(
        "smoke", help="the whole path at toy size (a one-lr scan and seed 0 of one row): a machine check"
    )
    sm.add_argument("--out", default="runs/claims-smoke", help="its run folders; its rows go to OUT/results")
    sm.add_argument("--device", default="cpu")
    sm.add_argument("--model", help="the model's name or path")
    sm.add_argument("--forwards", type=int, default=20)
    sm.add_argument("--row", default="mezo", help="a row of the protocol (default mezo)")
    sm.add_argument("--task", default="sst2", choices=sorted(TASKS), help="a task of the protocol (default sst2)")
    a = p.parse_args(argv)
    try:
        return _dispatch(a)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        print(f"python -m zotune.bench.claims {a.command}: error: {err}", file=sys.stderr)
        return 2


def _dispatch(a: argparse.Namespace) -> int:
    protocol = PROTOCOL
    out = Path(a.out)
    if a.command == "smoke":
        smoke = smoke_protocol(a.forwards, a.row, a.task)
        summary = run_grid(smoke, out, out / "results", device=a.device, lanes=1, model=a.model, poll=0.5)
        for row in Results.load(out / "results").rows.values():
            print(f"{row['cell']}: {row['forwards']} forwards, {row['steps']} steps, best dev {row['best_dev']:.3f} "
                  f"(zero-shot {row['zero_shot_dev']:.3f}), test {row['test']:.3f} (n = {row['test_n']}), "
                  f"{row['seconds']:.0f} s on {row['device']}")  # fmt: skip
        return 0 if summary["counts"] == {"done": 2} else 1
    if a.command in ("plan", "run"):
        profile = a.profile or profile_of(a.device)
    if a.command == "plan":
        sts, chosen = statuses(protocol, out, Results.load(a.results), profile)
        sts = [st for st in sts if _selected(st, a.only, a.phase)]
        print(format_plan(sts, chosen, protocol, Results.load(a.results)))
        return 0
    if a.command == "run":
        if a.lanes < 1:
            raise ValueError(f"--lanes {a.lanes}: must be at least 1")
        summary = run_grid(
            protocol, out, a.results, device=a.device, profile=profile, lanes=a.lanes, only=a.only, phase=a.phase,
            deadline=a.deadline_seconds, grace=a.grace, prune=a.prune, threads=a.threads,
            max_failures=a.max_failures, model=a.model,
        )  # fmt: skip
        failed = any(v.startswith("failed") for v in summary["outcomes"].values())
        return 1 if failed else 0
    if a.command == "summarize":
        added = summarize_finished(protocol, out, Results.load(a.results))
        print(f"summarized {len(added)} cell(s) into {a.results}: {', '.join(added) or 'none new'}")
        return 0
    if a.command == "pack":
        info = pack(out, a.tarball)
        print(f"packed {len(info['cells'])} finished cell(s) into {info['tarball']} ({info['bytes'] / 2**20:.1f} MiB)")
        return 0
    if a.command == "unpack":
        info = unpack(a.tarball, out, a.results, protocol)
        print(f"unpacked {len(info['unpacked'])} cell(s), kept {len(info['kept_local'])} local, "
              f"summarized {len(info['summarized'])}")  # fmt: skip
        return 0
    if a.command == "reach":
        rows = a.rows.split(",") if a.rows else None
        seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else None
        done = run_reach(protocol, a.results, out, rows=rows, seeds=seeds, device=a.device, model=a.model)
        print(f"recorded {len(done)} run(s) in {Path(a.results) / 'reach.jsonl'}")
        return 0
    if a.command == "set-aside":
        row = set_aside(protocol, Results.load(a.results), out, a.cell, a.why)
        print(f"set aside {a.cell} (lr {row['lr']:g}): it runs again under the protocol")
        return 0
    if a.command == "check":
        import tempfile

        into = a.into or tempfile.mkdtemp(prefix=f"claims-check-{a.cell}-")
        res = check_cell(a.results, a.cell, into, forwards=a.forwards, device=a.device)
        print(json.dumps(res, indent=1))
        if a.record:
            path = Path(a.results) / "checks.jsonl"
            old = path.read_text() if path.is_file() else ""
            cmd = f"python -m zotune.bench.claims check {a.cell} --forwards {a.forwards}" + (
                f" --device {a.device}" if a.device else ""
            )
            atomic_write_text(path, old + json.dumps(res | {"forwards": a.forwards, "command": cmd}) + "\n")
        return 0 if res["ok"] else 1
    print(table(a.results, protocol), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
