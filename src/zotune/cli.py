"""The ``zotune`` command line.

    zotune demo                    # MeZO on SmolLM2-135M-Instruct and real SST-2 examples: loss in and out
    zotune bench --out r.json      # speed and memory ratios of a ZO step (see zotune.bench)

``train``, ``eval``, ``replay`` and ``plot`` (YAML configs, run directories) are the next subcommands to come.
"""

from __future__ import annotations

import argparse
import sys
import time


def _sst2_batch(tokenizer, rows, max_length: int = 64):
    """MeZO's SST-2 prompt ``<sentence> It was`` + `` great``/`` terrible``; the loss is on the label word only."""
    import torch

    words = {0: " terrible", 1: " great"}
    ids, labels = [], []
    for r in rows:
        prompt = tokenizer(r["sentence"] + " It was", add_special_tokens=False)["input_ids"][: max_length - 4]
        target = tokenizer(words[r["label"]], add_special_tokens=False)["input_ids"]
        ids.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }
    return batch


def demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="zotune demo",
        description="Fine-tune the default model with MeZO on a few real SST-2 examples; print the loss in and out.",
    )
    p.add_argument("--model", default="smollm2-135m", help="packaged name, HF folder, .gguf file or hub id")
    p.add_argument("--examples", type=int, default=16, help="SST-2 training examples (one fixed batch)")
    p.add_argument("--steps", type=int, default=30, help="MeZO steps (2 forwards each)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="gaussian", choices=["gaussian", "rademacher"])
    p.add_argument("--data", default=None, help="data folder (default: $ZOTUNE_DATA or ../shared/data)")
    a = p.parse_args(argv)
    if a.examples < 1 or a.steps < 1:
        p.error("--examples and --steps must be >= 1")

    import torch
    from tqdm.auto import tqdm

    import zotune
    from zotune.models import load
    from zotune.tasks import read_sst2

    rows = read_sst2("train", limit=a.examples, data_dir=a.data)
    print(f"[zotune] loading {a.model} ...", flush=True)
    model, tok = load(a.model)
    batch = _sst2_batch(tok, rows)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[zotune] {n_params / 1e6:.1f} M parameters; {len(rows)} SST-2 examples, prompt '<sentence> It was'")

    def loss() -> torch.Tensor:
        return model(**batch).loss

    opt = zotune.MeZO(model.named_parameters(), lr=a.lr, eps=a.eps, seed=a.seed, sampler=a.sampler)
    with torch.no_grad():
        loss_in = loss().item()
    print(f"[zotune] loss in : {loss_in:.4f}")
    t0 = time.perf_counter()
    bar = tqdm(range(a.steps), desc="MeZO", unit="step")
    for _ in bar:
        step_loss = opt.step(loss)
        bar.set_postfix(loss=f"{step_loss.item():.4f}")
    dt = time.perf_counter() - t0
    with torch.no_grad():
        loss_out = loss().item()
    print(f"[zotune] loss out: {loss_out:.4f}  ({loss_out - loss_in:+.4f} after {a.steps} steps, {dt:.0f} s)")
    print(f"[zotune] update log: {len(opt.update_log)} records; replay(base, log) rebuilds these weights")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": demo, "bench": lambda rest: __import__("zotune.bench.speed").bench.speed.main(rest)}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nzotune: unknown command {argv[0]!r}; choose one of: {', '.join(commands)}", file=sys.stderr)
            return 2
        return 0
    try:
        return commands[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError) as e:  # bad input or missing files: one line, no traceback
        print(f"zotune {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
