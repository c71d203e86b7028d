"""zotune eval vs EleutherAI's lm-eval on the same model, task, template and verbalizer: accuracy and every
candidate's log-likelihood.

For each model (the packaged SmolLM2-135M-Instruct, zero-shot, and a zotune export fine-tuned for a few MeZO steps)
and each task (SST-2 and RTE, MeZO's templates, their full validation sets), it

1. runs ``zotune eval MODEL --task TASK --split test`` (in process, the CLI's own code path); the fine-tuned model
   is a short MeZO run of the main recipe (``train.export: true``), exported with its last weights by
   ``zotune replay RUN --out DIR`` (RUN/model keeps the best-on-dev weights, which a few steps rarely change);
2. writes the same examples as a local lm-eval task: SST-2 as a user would write it, from the raw sentences
   (``doc_to_text: "{{sentence}} It was"``, choices ``terrible`` / ``great`` after lm-eval's default ``" "``
   delimiter); RTE from zotune's rendered prompts and candidates (``doc_to_text: "{{prompt}}"``,
   ``doc_to_choice: "{{choices}}"``, ``target_delimiter: ""``), the generic recipe for any zotune task;
3. runs lm-eval (``simple_evaluate``, model ``hf``, fp32, zero-shot, samples logged) and compares its ``acc`` with
   zotune's accuracy, and per candidate its summed log-likelihood with zotune's length-normalized score times the
   candidate's token count (equal for one-token candidates, where lm-eval's ``acc`` is zotune's rule).

    PYTHONPATH=src python benchmarks/lmeval_check.py --out benchmarks/results/lmeval --work /tmp/lmeval-work

Only ``check.json`` goes to ``--out``; the data files, task YAMLs, lm-eval's inputs and the run go to ``--work``.

Needs ``lm-eval`` (``pip install 'zotune[eval]'``) and the SST-2 / RTE files of the benchmark data folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TASKS = ("sst2", "rte")


def export_task(task: str, examples: list, folder: Path) -> str:
    """Write ``examples`` as ``folder/<name>.jsonl`` and the lm-eval task YAML beside it; return the task name."""
    name = f"zotune_{task}"
    rows = []
    for ex in examples:
        if task == "sst2":  # the raw sentence; the template and verbalizer live in the YAML, as a user writes them
            rows.append({"sentence": ex.meta["text"], "label": ex.label})
        else:  # the generic form: zotune's rendered prompt and candidates
            rows.append({"prompt": ex.prompt, "choices": list(ex.candidates), "label": ex.label})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if task == "sst2":
        body = 'doc_to_text: "{{sentence}} It was"\ndoc_to_choice: ["terrible", "great"]\n'
    else:
        body = 'doc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\ntarget_delimiter: ""\n'
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        f"{body}"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return name


def zotune_side(
    model_path: str, task: str, out: Path, limit: int | None = None
) -> tuple[dict[str, Any], list, list[list[float]], Any]:
    """``zotune eval`` (the CLI) on the test split, with the per-candidate scores it computed on the way."""
    import importlib

    from transformers import AutoTokenizer

    from zotune.cli import main as cli

    zev = importlib.import_module("zotune.tasks.evaluate")  # the module (zotune.tasks.evaluate is also a function)
    seen: list = []
    score = zev.score_candidates

    def recording(model: Any, tokenizer: Any, examples: list, **kw: Any) -> list[list[float]]:
        scores = score(model, tokenizer, examples, **kw)
        seen.append((list(examples), scores))
        return scores

    result_file = out / f"zotune-{task}-{Path(model_path).name}.json"
    zev.score_candidates = recording  # the CLI's own scoring, recorded: no second pass
    try:
        argv = ["eval", model_path, "--task", task, "--split", "test", "--out", str(result_file)]
        rc = cli(argv + (["--limit", str(limit)] if limit else []))
    finally:
        zev.score_candidates = score
    if rc != 0:
        raise SystemExit(f"zotune eval failed on {model_path} {task}")
    (examples, scores), tok = seen[-1], AutoTokenizer.from_pretrained(model_path)
    return json.loads(result_file.read_text()), examples, scores, tok


def lmeval_side(model_path: str, name: str, folder: Path) -> tuple[float, dict[int, list[float]], str]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_path},dtype=float32,device=cpu",
        tasks=[name],
        task_manager=TaskManager(include_path=str(folder)),
        num_fewshot=0,
        batch_size=32,
        log_samples=True,
    )
    acc = res["results"][name]["acc,none"]
    lls = {int(s["doc_id"]): [float(r[0][0]) for r in s["resps"]] for s in res["samples"][name]}
    return acc, lls, lm_eval.__version__


def compare(model_path: str, label: str, out: Path, tasks=TASKS, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for task in tasks:
        done = out / f"row-{Path(model_path).name}-{task}.json"  # a rerun skips the pairs already compared
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        t0 = time.perf_counter()
        result, examples, scores, tok = zotune_side(model_path, task, out, limit)
        name = export_task(task, examples, out)
        acc, lls, version = lmeval_side(model_path, name, out)
        n_tokens = [[len(tok(c, add_special_tokens=False)["input_ids"]) for c in ex.candidates] for ex in examples]
        diffs = [
            abs(s * n - lls[i][j])
            for i, (row, counts) in enumerate(zip(scores, n_tokens, strict=True))
            for j, (s, n) in enumerate(zip(row, counts, strict=True))
        ]
        # lm-eval moves a prompt's trailing whitespace into every continuation (RTE's prompt ends in "\n"), so its
        # log-likelihoods then include log p("\n" | prompt), the same for each candidate of an example: compare the
        # margins between candidates, which decide the prediction, as well as the raw values
        margins = [
            abs((lls[i][j] - lls[i][0]) - (row[j] * counts[j] - row[0] * counts[0]))
            for i, (row, counts) in enumerate(zip(scores, n_tokens, strict=True))
            for j in range(1, len(row))
        ]
        picks = [max(range(len(r)), key=r.__getitem__) for r in scores]
        lm_picks = [max(range(len(lls[i])), key=lls[i].__getitem__) for i in range(len(examples))]
        rows.append(
            {
                "model": label,
                "model_path": model_path,
                "task": task,
                "n": len(examples),
                "zotune_eval_accuracy": result["accuracy"],
                "lm_eval_acc": acc,
                "same_accuracy": result["accuracy"] == acc,
                "same_prediction_every_example": picks == lm_picks,
                "candidate_tokens": sorted({n for c in n_tokens for n in c}),
                "max_abs_loglik_diff": max(diffs),
                "mean_abs_loglik_diff": sum(diffs) / len(diffs),
                "max_abs_margin_diff": max(margins),
                "context_ends_in_whitespace": any(ex.prompt != ex.prompt.rstrip() for ex in examples),
                "zotune_scores": scores,
                "lm_eval_logliks": [lls[i] for i in range(len(examples))],
                "lm_eval_version": version,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        done.write_text(json.dumps(rows[-1]))
        print(
            json.dumps({k: v for k, v in rows[-1].items() if k not in ("zotune_scores", "lm_eval_logliks")}),
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for check.json")
    p.add_argument("--work", type=Path, required=True, help="folder for the task files, the run and the results")
    p.add_argument("--steps", type=int, default=5, help="MeZO steps of the fine-tuned export")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--limit", type=int, default=None, help="the first N test examples only (default: all)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    import torch

    from zotune.models.load import convert_gguf

    torch.set_num_threads(2)
    base = str(convert_gguf("smollm2-135m"))
    run = a.work / "run"
    if not (run / "model" / "config.json").exists():  # a short MeZO run of the main recipe, exported
        cmd = [sys.executable, "-m", "zotune.cli", "train", "--config", "recipes/smollm2-sst2-mezo.yaml"]
        cmd += ["--train.steps", str(a.steps), "--train.eval_every", "0", "--train.eval_limit", "32"]
        cmd += ["--train.test", "false", "--train.test_at_start", "false", "--train.export", "true"]
        cmd += ["--train.progress", "false", "--out", str(run), "--overwrite", "true"]
        subprocess.run(cmd, check=True)
    # RUN/model holds the best-on-dev weights, which a few steps rarely change; the update log gives the weights
    # after the last step, exported the same way (zotune replay: Hugging Face format)
    tuned = run / "replayed"
    if not (tuned / "config.json").exists():
        replay = [sys.executable, "-m", "zotune.cli", "replay", str(run), "--out", str(tuned), "--overwrite"]
        subprocess.run(replay, check=True)
    rows = compare(base, "smollm2-135m (zero-shot)", a.work, a.tasks, a.limit)
    tuned_label = f"smollm2-135m + MeZO {a.steps} steps (zotune replay export)"
    rows += compare(str(tuned), tuned_label, a.work, a.tasks, a.limit)
    summary = {
        "command": " ".join(["python", "benchmarks/lmeval_check.py", *(argv or sys.argv[1:])]),
        "rows": [{k: v for k, v in r.items() if k not in ("zotune_scores", "lm_eval_logliks")} for r in rows],
        "all_same_accuracy": all(r["same_accuracy"] for r in rows),
        "max_abs_loglik_diff": max(r["max_abs_loglik_diff"] for r in rows),
        "max_abs_margin_diff": max(
            (r["max_abs_margin_diff"] for r in rows if "max_abs_margin_diff" in r), default=None
        ),
    }
    (a.out / "check.json").write_text(json.dumps(summary, indent=1) + "\n")
    per_candidate = [{k: r.get(k) for k in ("model", "task", "zotune_scores", "lm_eval_logliks")} for r in rows]
    (a.out / "per-candidate.json").write_text(json.dumps(per_candidate) + "\n")  # zotune: mean per token
    print(f"same accuracy in {sum(r['same_accuracy'] for r in rows)} of {len(rows)} (model, task) pairs; "
          f"max |log-likelihood difference| {summary['max_abs_loglik_diff']:.2e}")  # fmt: skip
    return 0 if summary["all_same_accuracy"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
