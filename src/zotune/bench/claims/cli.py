"""The command line of the claims grid (``python -m zotune.bench.claims``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ...core.log import atomic_write_text
from ...core.svrg import terms
from ...train.checkpoint import run_update_log
from .burst import pack, unpack
from .cell import check_cell, run_cell
from .driver import format_plan, profile_of, run_grid, selected
from .protocol import PROFILES, PROTOCOL, TASKS, smoke_protocol
from .reach import run_reach
from .results import Results, park, set_aside, statuses, summarize_finished
from .verdicts import table


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cell"]:
        if len(argv) != 2:
            print("usage: python -m zotune.bench.claims cell CONFIG.yaml", file=sys.stderr)
            return 2
        return run_cell(argv[1])
    p = argparse.ArgumentParser(
        prog="python -m zotune.bench.claims", description=sys.modules[__package__].__doc__.split("\n\n")[0]
    )
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
    r.add_argument(
        "--carry-over", action="store_true",
        help="start cells that cannot finish before the deadline too: it stops them with a checkpoint and a later "
        "run resumes them (keep the --out folder)",
    )  # fmt: skip
    r.add_argument("--prune", choices=("auto", "none", "checkpoints", "all"), default="auto")
    r.add_argument("--threads", type=int, help="intra-op threads per cell (default: CPU cores ÷ lanes)")
    r.add_argument("--max-failures", type=int, default=3)
    r.add_argument("--model", help="the model's name or path (e.g. the GGUF file carried to another machine)")
    sub.add_parser("summarize", parents=[common], help="summarize finished cells into --results")
    sub.add_parser(
        "park", parents=[common, grid_opts],
        help="keep the unfinished cells in RESULTS/parked without their weights (run does it as it ends)",
    )  # fmt: skip
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
    sv = sub.add_parser("svrg", parents=[common], help="MeZO-SVRG cells' minibatch and anchor terms (update logs)")
    sv.add_argument("cells", nargs="+", help="cells under --out, or run folders")
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
    if a.command in ("plan", "run", "park"):
        profile = a.profile or profile_of(a.device)
    if a.command == "plan":
        sts, chosen = statuses(protocol, out, Results.load(a.results), profile)
        sts = [st for st in sts if selected(st, a.only, a.phase)]
        print(format_plan(sts, chosen, protocol, Results.load(a.results)))
        return 0
    if a.command == "run":
        if a.lanes < 1:
            raise ValueError(f"--lanes {a.lanes}: must be at least 1")
        summary = run_grid(
            protocol, out, a.results, device=a.device, profile=profile, lanes=a.lanes, only=a.only, phase=a.phase,
            deadline=a.deadline_seconds, grace=a.grace, carry_over=a.carry_over, prune=a.prune, threads=a.threads,
            max_failures=a.max_failures, model=a.model,
        )  # fmt: skip
        failed = any(v.startswith("failed") for v in summary["outcomes"].values())
        return 1 if failed else 0
    if a.command == "park":
        done = park(protocol, out, Results.load(a.results), profile)
        print(", ".join(f"{k} {len(v)}" for k, v in done.items()))
        return 1 if done["refused"] else 0
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
    if a.command == "svrg":
        for cell in a.cells:
            run = Path(cell) if Path(cell).is_dir() else out / cell
            print(json.dumps({"cell": run.name} | terms(run_update_log(run)[0])))
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
