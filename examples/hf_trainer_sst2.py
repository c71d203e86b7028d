"""Fine-tune SmolLM2-135M-Instruct on SST-2 with a plain ``transformers.Trainer`` script, by MeZO.

The script is an ordinary causal-LM Trainer script (tokenize, collate, ``TrainingArguments``, ``Trainer``,
``train()``). Two lines make it zeroth-order: the import of ``ZOTrainer`` in place of ``Trainer``, and
``method="mezo"`` (any registered zotune method: ``lozo``, ``mezo_svrg``, ``hizoo``, ``zo_adam``, ...).

Each example is MeZO's SST-2 prompt ``<sentence> It was`` followed by `` great`` or `` terrible``; the labels mask
the prompt (-100), so the loss is on the answer word only. Evaluation reports the held-out loss; checkpoints hold
the update log (``updates.jsonl``) beside the weights.

Run (from the checkout; the model comes from the packaged GGUF, SST-2 from ../shared/data or $ZOTUNE_DATA)::

    python examples/hf_trainer_sst2.py --max_steps 200 --output_dir runs/hf-sst2-mezo
    python examples/hf_trainer_sst2.py --max_steps 400 --output_dir runs/hf-sst2-mezo --resume   # continue it
"""

from __future__ import annotations

import argparse
import random

from transformers import DataCollatorForSeq2Seq, TrainingArguments

from zotune.integrations.hf import ZOTrainer as Trainer  # was: from transformers import Trainer
from zotune.models import load
from zotune.tasks import read_sst2

WORDS = {0: " terrible", 1: " great"}


def encode(tokenizer, row: dict) -> dict:
    prompt = tokenizer(f"{row['sentence']} It was", add_special_tokens=False)["input_ids"]
    answer = tokenizer(WORDS[row["label"]], add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a zotune model name, a local HF folder or a .gguf file")
    p.add_argument("--max_steps", type=int, default=200)
    p.add_argument("--output_dir", default="runs/hf-sst2-mezo")
    p.add_argument("--n_train", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    a = p.parse_args()

    model, tokenizer = load(a.model)
    rows = read_sst2("train")
    random.Random(0).shuffle(rows)
    train = [encode(tokenizer, r) for r in rows[: a.n_train]]
    dev = [encode(tokenizer, r) for r in read_sst2("dev")[:200]]

    args = TrainingArguments(
        output_dir=a.output_dir,
        max_steps=a.max_steps,
        per_device_train_batch_size=16,
        learning_rate=5e-5,  # MeZO on this 135 M model (recipes/smollm2-sst2-mezo.yaml); AdamW would take ~1e-5
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=25,
        per_device_eval_batch_size=32,
        save_strategy="steps",
        save_steps=25,
        save_total_limit=2,
        logging_steps=5,
        report_to="none",
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        processing_class=tokenizer,
        method="mezo",  # the one new argument
    )
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    print(trainer.evaluate())
    trainer.save_model()  # the weights, and updates.jsonl: zotune.replay(base, "updates.jsonl") rebuilds them


if __name__ == "__main__":
    main()
