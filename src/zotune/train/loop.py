"""The training loop: one function, :func:`train`, for every method, read top to bottom as set-up, steps, finish.

Set-up (:func:`zotune.train.setup.start`) checks the config against the method's declared capabilities, opens the
run directory, loads the model and builds the method's *stepper* (:mod:`zotune.methods.steppers`), then resumes from
the newest checkpoint if asked. Each step the loop asks the stepper what the step costs (the forward budget), runs
it, steps the LR schedules, logs a metrics line, and now and then evaluates on dev, keeps the best-on-dev weights and
writes a checkpoint. At the end the best weights are evaluated on test. The loop never looks at which method runs:
ZO methods, the first-order baselines and Bilevel ZOFO differ only in their steppers. See
:mod:`zotune.train.rundir` for the files of a run directory.

Example (a tiny random model; real runs go through ``zotune train``)::

    >>> from zotune.train import run_config_from_dict, train
    >>> cfg = run_config_from_dict({"model": {"name": "path/to/model"}, "train": {"steps": 100}})  # doctest: +SKIP
    >>> results = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from .. import dist as zd
from ..core import NonFiniteLossError
from ..core.memory import peak_memory_bytes, reset_peak_memory
from ..methods.steppers import StepResult
from . import checkpoint as ckpt
from .config import TrainConfig
from .rundir import export_model, write_json
from .safety import Interrupted, StopOnSignal, sigterm_interrupts, stop_everywhere
from .setup import LoopState, Session, start

__all__ = ["Interrupted", "TrainingStopped", "steps", "train"]

logger = logging.getLogger("zotune.train")


class TrainingStopped(RuntimeError):
    """The watchdog stopped the run (NaN/inf, collapsed or diverging loss); the message says why and what to try."""


def train(cfg: Any, *, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the fine-tuning described by ``cfg`` (see :mod:`zotune.train.config`); return the results.

    Under ``torchrun`` (``torchrun --no-python --nproc-per-node N zotune train ...``) the ranks split each step as
    ``train.distributed`` says (:mod:`zotune.dist`): only scalars cross the wire, rank 0 alone writes the run
    directory, evaluation is sharded, and a run resumes at any world size (shared directions).

    Raises :class:`TrainingStopped` when the watchdog stops the run (after writing the results of the best
    weights so far), :class:`~zotune.train.config.ConfigError` on a bad config or run directory,
    :class:`~zotune.dist.RankLost` when another rank died or stalled past ``train.dist_timeout``, and
    :class:`~zotune.train.safety.Interrupted` on SIGINT (Ctrl-C) or SIGTERM: during the training steps at the next
    step boundary, after a checkpoint of that step (its ``step`` and ``run`` say where; ``--resume true``
    continues), elsewhere at once (``step`` None).
    """
    owned = not zd.is_initialized() and zd.init(timeout_s=cfg.train.dist_timeout)
    try:
        with sigterm_interrupts():  # SIGTERM outside the steps interrupts as Ctrl-C does (and undoes a start)
            began = time.perf_counter()
            run = start(cfg, argv)  # checks, run directory, model, stepper, resume
            if run.fresh:
                zero_shot(run)
            stopped = steps(run)
            results = finish(run, stopped, began)
            if owned and zd.world() > 1:
                zd.barrier()  # no rank destroys the group while another still has work in flight on it
            return results
    except Interrupted:
        owned = owned and zd.world() == 1  # torchrun's SIGTERM may mean a rank died: leave the group alone
        raise
    except RuntimeError as err:
        if isinstance(err, TrainingStopped | NonFiniteLossError) or not zd.is_comm_failure(err):
            raise
        owned = False  # a broken group: destroying it could hang or abort; the process exits instead
        raise zd.RankLost(
            f"rank {zd.rank()} of {zd.world()} lost contact with the other ranks ({str(err).splitlines()[0][:200]}): "
            f"a rank died or stalled for longer than train.dist_timeout={cfg.train.dist_timeout:g} s. Nothing "
            f"after the last checkpoint was kept; continue the run with the same command and --resume true"
        ) from err
    finally:
        if owned:
            zd.shutdown()


def zero_shot(run: Session) -> None:
    """The untouched model on dev (the first best weights) and, with ``train.test_at_start``, on test."""
    state, tc = run.state, run.train_cfg
    rec = run.evaluator.run("dev", 0, state.forwards)
    metric = run.evaluator.metric
    state.best_metric, state.best_step = rec[metric], 0
    state.history["zero_shot_dev"] = rec[metric]
    run.save_best(0, metric)
    if tc.test and tc.test_at_start:
        state.history["zero_shot_test"] = run.evaluator.run("test", 0, state.forwards)[metric]


def steps(run: Session) -> str | None:
    """Train until ``train.steps``; returns why the run stopped early (budget, early stopping, watchdog) or None.

    SIGINT/SIGTERM end the loop at a step boundary on every rank: the step's checkpoint is saved, then
    :class:`~zotune.train.safety.Interrupted` is raised (a second Ctrl-C stops at once)."""
    tc, state, stepper = run.train_cfg, run.state, run.stepper
    n_ranks, device = zd.world(), next(iter(run.trained.values())).device
    stopped, saved, received = None, state.step, None
    began = time.perf_counter()
    # The set-up (loading, a sparse mask's Fisher scores, the zero-shot evaluation) can peak above the training
    # itself: keep its peak, then measure the training phase's (its steps and evaluations) on its own.
    setup_peak = peak_memory_mb(device)
    phased = reset_peak_memory(device)
    with StopOnSignal() as stop, run.progress():
        if out_of_time(tc, state.seconds):  # resumed with its time budget already spent
            stopped = time_budget_reached(tc, state.seconds)
        while stopped is None and state.step < tc.steps:
            if tc.max_forwards is not None and state.forwards + stepper.cost() > tc.max_forwards:
                stopped = f"forward-pass budget reached ({state.forwards} of {tc.max_forwards})"
                break
            t0, sent0 = time.perf_counter(), zd.COUNTER.total
            try:
                res = stepper.step(state.step)
            except NonFiniteLossError as err:
                stopped = f"watchdog: {err}. Try: a lower lr or eps, or model.dtype bfloat16/float32 if it is float16"
                break
            for sched in run.schedulers:
                sched.step()
            state.step += 1
            state.forwards += res.forwards
            state.backwards += res.backwards
            record = {"kind": "train", "step": state.step, **res.fields, "loss": res.loss, "forwards": state.forwards}
            if state.backwards:
                record["backwards"] = state.backwards
            record["step_time"] = time.perf_counter() - t0
            if n_ranks > 1:  # payload bytes this rank sent + received in the step's collectives
                record["comm_bytes"] = zd.COUNTER.total - sent0
            peak = peak_memory_mb(device)
            record["peak_mem_mb"] = max(setup_peak, peak)  # the process's, set-up included
            if phased:
                record["train_peak_mem_mb"] = peak
            record["epoch"] = stepper.epoch(state.step)
            run.metrics.write(record)
            if n_ranks > 1 and (state.step == 1 or state.step % tc.sync_every == 0):
                zd.check_in_sync(list(run.trained.items()))  # every rank raises together if one has drifted
            if state.initial_loss is None:
                state.initial_loss = res.loss
            if tc.watchdog and (reason := watchdog(res, state, tc)):
                stopped = reason
                break
            if run.bar is not None:
                run.bar.update(1)
                run.bar.set_postfix(loss=f"{res.loss:.4f}", best_dev=f"{state.best_metric or 0:.3f}")
            # the last step: the step budget, the forward budget cannot pay for another step, or the time budget is
            # spent (evaluate it)
            timed_out = out_of_time(tc, state.seconds + time.perf_counter() - began)
            last = (
                state.step == tc.steps
                or (tc.max_forwards is not None and state.forwards + stepper.cost() > tc.max_forwards)
                or timed_out
            )
            if run.evaluator is not None and ((tc.eval_every and state.step % tc.eval_every == 0) or last):
                stopped = evaluate_dev(run, last) or stopped
            if (tc.checkpoint_every and state.step % tc.checkpoint_every == 0) or last:
                state.seconds += time.perf_counter() - began
                began = time.perf_counter()
                run.save_checkpoint()
                saved = state.step
            if timed_out and state.step < tc.steps:
                stopped = stopped or time_budget_reached(tc, state.seconds)  # seconds updated by the checkpoint
            if stopped:
                break
            if received := stop_everywhere(stop.received):  # a signal on any rank: every rank stops here
                stopped = f"{received}: stopped at step {state.step}"
                break
        state.seconds += time.perf_counter() - began
        stepper.settle()  # every rank; before the best weights are loaded back for the test
        if stopped and not stopped.startswith("watchdog") and saved != state.step:
            run.save_checkpoint()  # a budget or signal stop keeps its work; a watchdog stop keeps only what was saved
    if received:
        raise Interrupted(received, state.step, run.dir)
    return stopped


def out_of_time(tc: TrainConfig, elapsed: float) -> bool:
    """Whether ``elapsed`` training seconds spend ``train.max_seconds``; under torchrun every rank gets the same
    answer (any rank's clock past the budget stops them all at this step: one all-gather per call)."""
    if tc.max_seconds is None:
        return False
    over = elapsed >= tc.max_seconds
    if zd.world() > 1:
        over = any(row[0] for row in zd.all_gather_values([float(over)]))
    return over


def time_budget_reached(tc: TrainConfig, elapsed: float) -> str:
    return f"time budget reached ({elapsed:.1f} s of {tc.max_seconds:g} s)"


def evaluate_dev(run: Session, last: bool) -> str | None:
    """Dev evaluation: keep the weights when they are the best so far; returns a reason to stop early, if any."""
    state, tc, metric = run.state, run.train_cfg, run.evaluator.metric
    run.stepper.settle()  # the weights evaluated (and saved as the best) hold every update
    rec = run.evaluator.run("dev", state.step, state.forwards)
    if rec[metric] > state.best_metric:
        state.best_metric, state.best_step = rec[metric], state.step
        state.evals_since_best = 0
        run.save_best(state.step, metric)
        return None
    state.evals_since_best += 1
    if tc.early_stopping and state.evals_since_best >= tc.early_stopping and not last:
        return (
            f"early stopping: no better dev {metric} in {tc.early_stopping} evaluations "
            f"(best {state.best_metric:.4f} at step {state.best_step})"
        )
    return None


def finish(run: Session, stopped: str | None, began: float) -> dict[str, Any]:
    """The best-on-dev weights on test, the export, ``results.json`` and the plot; raises TrainingStopped after
    writing them if the watchdog stopped the run."""
    state, tc = run.state, run.train_cfg
    results: dict[str, Any] = {
        **run.summary,
        "steps": state.step,
        "forwards": state.forwards,
        "backwards": state.backwards,
        "zero_shot_dev": state.history.get("zero_shot_dev"),
        "zero_shot_test": state.history.get("zero_shot_test"),
        "best_dev": state.best_metric,
        "best_step": state.best_step,
        "stopped": stopped,
        "train_seconds": state.seconds,
        "trainable_parameters": sum(p.numel() for p in run.trained.values()),
    }
    best = ckpt.latest_checkpoint(run.dir, "best") if run.main else None
    if best is not None:
        ckpt.load_trainable(run.model, best / "trainable.safetensors")
    zd.broadcast_parameters(list(run.trained.items()))  # rank 0's best weights, for the sharded test evaluation
    if tc.test:
        label = f"fine-tuned (best dev at step {state.best_step})"
        rec = run.evaluator.run("test", state.best_step or 0, state.forwards, label)
        results["test"] = rec[run.evaluator.metric]
        results["test_n"] = rec["n"]
        if "em" in rec:
            results["test_em"] = rec["em"]
    if tc.export:
        if run.main:
            export_model(run.stepper.export_model(), run.tokenizer, run.dir / "model")
        results["export"] = str(run.dir / "model")
    run.metrics.close()
    results["seconds"] = time.perf_counter() - began
    if zd.world() > 1:
        results["world_size"] = zd.world()
        results["distributed"] = tc.distributed
    if run.main:  # rank 0 writes the results, the plot and the export
        write_json(run.dir / "results.json", results)
        try:
            from .plot import plot_runs

            title = f"{results['model']} · {results['task']} · {results['method']}"
            plot_runs([run.dir], run.dir / "plot.png", smooth=0.9, title=title)
        except ImportError:
            logger.info("matplotlib is not installed: no plot (pip install 'zotune[plot]')")
    if stopped and stopped.startswith("watchdog"):
        raise TrainingStopped(stopped)
    return results


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last reset (or of the process so far): CUDA ``max_memory_allocated`` or the CPU peak
    resident set, in MiB (:func:`zotune.core.memory.peak_memory_bytes`)."""
    return peak_memory_bytes(device) / 2**20


def watchdog(res: StepResult, state: LoopState, tc: Any) -> str | None:
    """A reason to stop after ``patience`` bad steps in a row: a loss collapsed to ~0, diverging, or stuck.

    Stuck means the step's loss differences were all exactly zero (ℓ+ == ℓ−): the perturbation no longer changes
    the loss (ε below the dtype's resolution, as with float16, or a saturated model after a too-large step), so the
    projected gradient is 0 and nothing moves.
    """
    loss = res.loss
    collapsed = loss < 1e-6
    diverging = state.initial_loss is not None and loss > tc.divergence * max(state.initial_loss, 1e-6)
    state.bad_steps = state.bad_steps + 1 if (collapsed or diverging or res.stuck) else 0
    if state.bad_steps < tc.patience:
        return None
    if collapsed:
        return (
            f"watchdog: the loss collapsed to {loss:.3g} for {tc.patience} steps (a known float16 failure under ZO): "
            "use model.dtype bfloat16 or float32"
        )
    if diverging:
        return (
            f"watchdog: the loss {loss:.4g} stayed above {tc.divergence:g} x the initial {state.initial_loss:.4g} "
            f"for {tc.patience} steps: lower the lr (or eps)"
        )
    return (
        f"watchdog: the ± losses were identical for {tc.patience} steps (loss {loss:.4g}), so the projected gradient "
        "is 0: the model saturated after too large a step (lower the lr) or eps is below the dtype's resolution "
        "(raise eps, or use float32 instead of float16)"
    )
