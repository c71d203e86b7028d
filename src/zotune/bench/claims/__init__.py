"""The claims grid: do the four seed papers' headline claims hold for SmolLM2-135M? A resumable driver and its table.

The protocol (written out in ``benchmarks/README.md``, section "Claims grid: protocol") is data in :mod:`.protocol`:
:data:`TASKS`, :data:`ROWS` (one line per method, with its fixed hyperparameters), :data:`COMPARISONS` (one line per
claim tested) and the budgets of :class:`Protocol`. Every grid cell is one ``zotune train`` run:

* ``scan`` cells: each scanned method's lr × {1/4, 1/2, 1, 2, 4} (TREC: × {1/4, 1/2, 1}) on seed 0 with a short
  budget; the best dev accuracy picks the lr (ties to the smaller lr), recorded in ``RESULTS/lr/TASK-ROW.json``
  with the scan's numbers;
* ``seeds`` cells: seeds 0, 1, 2 at the picked lr and the full budget. Stability rule: where a seed run diverged
  (the watchdog stopped it, or its training loss ended above 1.25 × its start), that lr and every larger one leave
  the pick; the row's seed runs at them are set aside (``RESULTS/superseded.jsonl``, kept and shown) and its seeds
  run again at the new pick;
* ``refs`` cells: FO-LoRA and FO full (AdamW) at their usual budget and lr, the same seeds.

A finished row an amendment has since changed is set aside by hand with its reason (``set-aside``): kept, listed in
the table, in no comparison; its cell runs again under the protocol.

A cell runs as ``python -m zotune.bench.claims cell CONFIG.yaml``: the config is built with
:func:`zotune.train.run_config_from_dict` from the recipe YAML and an overrides dict, so a cell needs neither an
installed zotune nor jsonargparse (``PYTHONPATH=src`` is enough), and resumes from its newest checkpoint when it was
stopped. A ``run`` ends by parking its unfinished cells in ``RESULTS/parked/CELL`` (the run folder without the
weights its update log rebuilds, :mod:`zotune.train.portable`): committed with the results, they resume on another
checkout, their weights replayed and checked against their recorded sha256. Finished cells are summarized
(:func:`zotune.bench.accuracy.summarize`) into ``RESULTS/runs.jsonl`` with their full config in
``RESULTS/configs/CELL.yaml``.

Commands (``bash benchmarks/claims.sh ...`` runs the same with the checkout's ``src`` on the path)::

    python -m zotune.bench.claims plan                          # every cell and its status
    python -m zotune.bench.claims run --lanes 2 --device cpu    # pending cells, 2 at a time, resumable
    python -m zotune.bench.claims run --device cuda --lanes 8 --deadline-seconds 480 --out /tmp/claims
    python -m zotune.bench.claims park                          # unfinished cells into RESULTS/parked, no weights
    python -m zotune.bench.claims pack --out /tmp/claims claims.tar.gz     # finished cells without weights
    python -m zotune.bench.claims unpack claims.tar.gz          # into --out, then summarized into --results
    python -m zotune.bench.claims table                         # RESULTS/claims.md (the results page section)
    python -m zotune.bench.claims set-aside CELL --why "..."    # a finished row out of the comparisons, kept
    python -m zotune.bench.claims reach --rows fzoo --seeds 0   # a packed row's first 100 forwards, dev every 25

The modules, each using only those above it: :mod:`.protocol` (the protocol and the grid of cells),
:mod:`.results` (rows, lr picks, statuses, summaries), :mod:`.cell` (one cell as a subprocess, and the spot-check),
:mod:`.reach` (sample efficiency at fine resolution), :mod:`.driver` (the lanes and the time estimate),
:mod:`.burst` (a results burst on another machine), :mod:`.verdicts` (verdicts, tables, curves) and :mod:`.cli`.

Papers: MeZO (Malladi et al., NeurIPS 2023), LOZO (Chen et al., ICLR 2025), MeZO-SVRG (Gautam et al., ICML 2024),
SensZOQ (Guo et al., ICLR 2025), Bilevel ZOFO (Shirkavand et al., 2025).

Example (the verdict rule)::

    >>> verdict([0.04, 0.05, 0.03])[0], verdict([0.01, -0.02, 0.02])[0], verdict([-0.05, -0.06, -0.04])[0]
    ('holds', 'inconclusive (spread larger than the difference)', 'does not hold at this scale')
"""

from .burst import pack, unpack
from .cell import check_cell, run_cell
from .cli import main
from .driver import cell_time_left, format_plan, profile_of, run_grid
from .protocol import (
    CLAIMS,
    COMPARISONS,
    PROFILES,
    PROTOCOL,
    ROWS,
    SPARSE,
    TASKS,
    Cell,
    Comparison,
    Protocol,
    Row,
    budget_of,
    cell_hparams,
    cell_tree,
    grid,
    protocol_diff,
    resolved,
    smoke_protocol,
)
from .reach import reach_interval, reach_summary, run_reach
from .results import (
    Results,
    Status,
    expected_config,
    loss_rise,
    park,
    pick_lr,
    picks,
    restore_parked,
    set_aside,
    set_aside_unstable,
    statuses,
    summarize_finished,
    unstable_lrs,
    write_picks,
)
from .verdicts import check_results, claims_section, compare, methods_table, table, verdict

__all__ = [
    "CLAIMS",
    "COMPARISONS",
    "Cell",
    "Comparison",
    "PROFILES",
    "PROTOCOL",
    "Protocol",
    "ROWS",
    "Results",
    "Row",
    "SPARSE",
    "Status",
    "TASKS",
    "budget_of",
    "cell_hparams",
    "cell_time_left",
    "cell_tree",
    "check_cell",
    "check_results",
    "claims_section",
    "compare",
    "expected_config",
    "format_plan",
    "grid",
    "loss_rise",
    "main",
    "methods_table",
    "pack",
    "park",
    "pick_lr",
    "picks",
    "profile_of",
    "protocol_diff",
    "reach_interval",
    "reach_summary",
    "resolved",
    "restore_parked",
    "run_cell",
    "run_grid",
    "run_reach",
    "set_aside",
    "set_aside_unstable",
    "smoke_protocol",
    "statuses",
    "summarize_finished",
    "table",
    "unpack",
    "unstable_lrs",
    "verdict",
    "write_picks",
]
