"""The claims grid's protocol as data: tasks, rows (one per method), the comparisons that test each claim,
the budgets, and the grid of cells with the run config of each."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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
    # of the SST-2 verdict, so SST-2 only); × 8, 16 added after its pick sat on the top edge with dev rising with lr.
    # The paper checks the loss once per epoch: 500 examples ÷ batch 16 = 31 steps, 16 of them minibatch steps at q 2
    # (amended from the optimizer's default of 50 after a seed run diverged between two 50-step checks)
    Row("mezo-svrg-paper", "mezo_svrg", {"lr": 1e-5, "anchor_lr": 1e-4, "eps": 1e-3, "q": 2, "anchor_size": 64,
        "anneal": 4.0, "anneal_every": 16}, fwd_per_step=6.0, scale=("lr", "anchor_lr"),
        label="MeZO-SVRG (paper's q 2, anneal 4 per epoch)", extra_factors=(8.0, 16.0), tasks=("sst2",)),
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
    * ``memory``: x_s = 1 − peak(a) ÷ peak(b), the training phase's peak memory (CPU: resident set), the same
      device: the rows' own (their steps and evaluations) when every seed row of both sides has one, else every
      cell's memory check (``check --record``: its first forwards' steps) — never the set-up's (model loading, a
      sparse mask's Fisher scores), which a mask computed elsewhere spares.
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
    here = Path(__file__).resolve().parents[4] / protocol.recipe
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

    from ...methods import METHODS

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
    from ...train.config import config_to_dict, run_config_from_dict

    return config_to_dict(run_config_from_dict(tree))


# keys that may differ from the protocol: where the run lives and ran, how it was started, how it reported
_FREE_KEYS = {"out", "model.device", "model.name", "data.data_dir", "resume", "overwrite", "allow_config_change"}
_FREE_KEYS |= {"train.progress", "train.tensorboard", "train.dist_timeout", "train.sync_every"}


def protocol_diff(found: dict[str, Any], expected: dict[str, Any], protocol: Protocol) -> list[str]:
    """What in a cell's config differs from the protocol's config for that cell, as ``key X (protocol: Y)``.

    Keys a run's config lacks (added to zotune after it ran) and other methods' sections are not counted. The
    model may be named by its packaged name or by the GGUF file it comes from (a machine without the wheel)."""
    from ...methods import METHODS
    from ...train.config import flatten

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
    from ...models.load import PACKAGED

    spec = PACKAGED.get(wanted)
    base = Path(name).name
    return spec is not None and (
        base == Path(spec.relpath).name or re.fullmatch(rf"{re.escape(wanted)}-[0-9a-f]{{12}}", base) is not None
    )


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
