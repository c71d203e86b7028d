"""Chat / instruction tasks: rows of messages or prompt/completion, the chat template, the loss on assistant turns
only, evaluation by loss, perplexity and F1/EM, training with ZO and first-order methods, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from tiny import save_tiny_model

from zotune.cli import main as cli
from zotune.tasks import Example, evaluate, load_split
from zotune.tasks.chat import chat_lm_loss, chat_prompt, chat_segments, chat_token_count, evaluate_chat
from zotune.tasks.custom import task_from_config
from zotune.tasks.instruct_demo import make_rows, write_task
from zotune.train import ConfigError, run_config_from_dict, train
from zotune.train.config import DataConfig
from zotune.train.data import build_splits, loss_weight, make_objective, objective_name, resolve_task

# ChatML-like, with {% generation %} marks so that transformers computes the assistant-token mask on its own: the
# reference the tests compare zotune's masking with
TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|endoftext|>\\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|endoftext|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def conversation(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": str(2 * i)},
        {"role": "user", "content": "And times two?"},
        {"role": "assistant", "content": f"It is {4 * i}."},
    ]


@pytest.fixture(scope="module")
def chatdir(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer has a chat template, and a chat task (JSON lines + task YAML)."""
    root = tmp_path_factory.mktemp("chat")
    rows = make_rows(60, seed=0)
    texts = [m["content"] for r in rows for m in r["messages"]] + [json.dumps(conversation(i)) for i in range(5)]
    save_tiny_model(root / "model", texts + ["<|user|>\n<|assistant|>\n<|system|>\n"] * 5, positions=256)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "model")
    for split, part in (("train", rows[:40]), ("dev", rows[40:50]), ("test", rows[50:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    spec = {"name": "instruct", "kind": "chat", "files": {s: f"{s}.jsonl" for s in ("train", "dev", "test")}}
    (root / "chat.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture(scope="module")
def model_tok(chatdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(chatdir / "model").eval(), AutoTokenizer.from_pretrained(
        chatdir / "model"
    )


def chat_example(messages: list[dict]) -> Example:
    return Example(prompt="", answers=[messages[-1]["content"]], kind="chat", messages=tuple(messages))


def reference_loss(model, tok, messages: list[dict]) -> tuple[float, int]:
    """transformers' own assistant mask (from the template's generation marks) and its LM loss: the reference."""
    enc = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    labels = enc["input_ids"].clone()
    labels[torch.as_tensor(enc["assistant_masks"]).reshape(labels.shape) == 0] = -100
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], labels=labels)
    return float(out.loss), int((labels[0, 1:] != -100).sum())


def test_loss_is_on_every_assistant_turn_only_as_transformers_masks_it(model_tok):
    model, tok = model_tok
    for i in range(3):
        messages = conversation(i + 1)
        ref, n_ref = reference_loss(model, tok, messages)
        ex = chat_example(messages)
        with torch.no_grad():
            ours = float(chat_lm_loss(model, tok, [ex]))
        assert ours == pytest.approx(ref, rel=1e-5)
        assert chat_token_count(tok, [ex]) == n_ref
    # both assistant turns are trained, with the end-of-turn token; nothing else is
    segments = chat_segments(tok, conversation(3))
    assert [text for text, assistant in segments if assistant] == ["6<|endoftext|>\n", "It is 12.<|endoftext|>\n"]
    assert "".join(text for text, _ in segments) == tok.apply_chat_template(conversation(3), tokenize=False)


def test_batch_loss_is_the_token_mean_whatever_the_batching_and_padding(model_tok):
    model, tok = model_tok
    examples = [chat_example(conversation(i)) for i in range(1, 5)]
    counts = [chat_token_count(tok, [ex]) for ex in examples]
    with torch.no_grad():
        singles = [float(chat_lm_loss(model, tok, [ex])) for ex in examples]
        whole = float(chat_lm_loss(model, tok, examples))
        small = float(chat_lm_loss(model, tok, examples, batch_size=3))
        tok.padding_side = "left"
        left = float(chat_lm_loss(model, tok, examples, batch_size=2))
        tok.padding_side = "right"
    expected = sum(s * c for s, c in zip(singles, counts, strict=True)) / sum(counts)
    assert whole == pytest.approx(expected, rel=1e-5)
    assert small == pytest.approx(whole, rel=1e-5) and left == pytest.approx(whole, rel=1e-5)
    assert loss_weight("chat", tok, None)(examples) == sum(counts)


def test_truncation_keeps_the_end_and_counts(model_tok):
    model, tok = model_tok
    ex = chat_example(conversation(7))
    full = chat_token_count(tok, [ex])
    n = len(tok(tok.apply_chat_template(conversation(7), tokenize=False), add_special_tokens=False)["input_ids"])
    stats: dict = {}
    with torch.no_grad():
        chat_lm_loss(model, tok, [ex], max_length=n - 2, stats=stats)
    assert stats["n_truncated"] == 1 and chat_token_count(tok, [ex], n - 2) == full  # only the system text was cut
    with pytest.raises(ValueError, match="no assistant token is left"):
        chat_token_count(tok, [ex], 1)


def test_rows_of_messages_prompt_completion_template_and_system(tmp_path):
    rows = [
        {"messages": conversation(1)},
        {"prompt": "Hi", "completion": "Hello"},
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = task_from_config({"kind": "chat", "files": {"train": str(tmp_path / "t.jsonl")}})
    a, b = load_split(task, "train")[:2]
    assert a.kind == "chat" and a.messages == tuple(conversation(1)) and a.answers == ["It is 4."]
    assert b.messages == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})
    (tmp_path / "c.csv").write_text('q,a,sys\nAdd 2 and 3,5,Be terse.\n"Say ""hi""",hi,\n')
    cfg = {"kind": "chat", "files": {"train": str(tmp_path / "c.csv")}, "template": "Question: {q}"}
    cfg["columns"] = {"completion": "a", "system": "sys"}
    first, second = load_split(task_from_config(cfg), "train")
    assert first.messages[0] == {"role": "system", "content": "Be terse."}
    user, answer = {"role": "user", "content": "Question: Add 2 and 3"}, {"role": "assistant", "content": "5"}
    assert first.messages[1:] == (user, answer)
    assert second.messages[0] == {"role": "system", "content": ""}  # an empty CSV cell is an empty system prompt
    # a fixed system prompt for every row that has none; a messages column makes it a chat task
    cfg = {"files": {"train": str(tmp_path / "t.jsonl")}, "columns": {"messages": "messages"}, "system": "S."}
    ex = load_split(task_from_config(cfg), "train")[0]
    assert ex.messages[0] == {"role": "system", "content": "Answer briefly."}  # the row's own system prompt wins


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, '
            '{"role": "user", "content": "?"}]}',
            "ends with a 'user' turn",
        ),  # fmt: skip
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'"),
        ('{"messages": [{"role": "user"}]}', "must be an object with 'role' and 'content'"),
        ('{"messages": "hello"}', "not a JSON list of messages"),
        ('{"messages": []}', "must be a non-empty list"),
        ('{"prompt": "hi"}', "needs a 'completion' column"),
        ('{"question": "hi"}', "needs a 'messages' list"),
        ('{"messages": [', "not valid JSON"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, match):
    good = json.dumps({"prompt": "a", "completion": "b"})
    path = tmp_path / "t.jsonl"
    path.write_text(f"{good}\n{line}\n")
    task = task_from_config({"kind": "chat", "files": {"train": str(path)}})
    with pytest.raises(ValueError, match=match) as err:
        load_split(task, "train")
    assert f"{path}:2" in str(err.value)


def test_a_tokenizer_without_a_chat_template_is_refused_before_training(chatdir, model_tok, tmp_path):
    model, tok = model_tok
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(chatdir / "model")
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        make_objective("chat", model, plain, max_length=None)
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompt(plain, conversation(1))
    # the CLI says so in one line and writes no run
    folder = tmp_path / "plain"
    model.save_pretrained(folder)
    plain.save_pretrained(folder)
    run = tmp_path / "run"
    argv = ["train", "--model.name", str(folder), "--data.task", str(chatdir / "chat.yaml"), "--out", str(run)]
    assert cli([*argv, "--train.steps", "1", "--train.progress", "false"]) == 2
    assert not (run / "config.yaml").exists()


def test_objectives_for_a_chat_task(chatdir):
    task = resolve_task(str(chatdir / "chat.yaml"))
    assert task.kind == "chat" and task.metric == "f1"
    assert objective_name(DataConfig(task="x"), task, "causal-lm") == "chat"
    assert objective_name(DataConfig(task="x", objective="lm"), task, "causal-lm") == "chat"
    assert objective_name(DataConfig(task="x", objective="f1"), task, "causal-lm") == "f1"
    with pytest.raises(ConfigError, match="is a chat task"):
        objective_name(DataConfig(task="x", objective="classification"), task, "causal-lm")


def test_evaluate_reports_loss_perplexity_f1_and_em(model_tok):
    model, tok = model_tok
    examples = [chat_example(conversation(i)) for i in range(1, 4)]
    res = evaluate(model, tok, examples, max_new_tokens=5)
    with torch.no_grad():
        loss = float(chat_lm_loss(model, tok, examples))
    assert res["kind"] == "chat" and res["loss"] == pytest.approx(loss, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert 0 <= res["em"] <= res["f1"] <= 1
    # F1/EM score greedy answers to the last turn: a model that has learned to answer gets them right
    from zotune.tasks.scoring import generate_answers

    prompts = [chat_prompt(tok, ex.messages) for ex in examples]
    preds = generate_answers(model, tok, examples, prompts=prompts, stop=None, add_specials=False, max_new_tokens=5)
    fake = [
        chat_example([*conversation(i + 1)[:-1], {"role": "assistant", "content": p}]) for i, p in enumerate(preds)
    ]
    got = evaluate_chat(model, tok, fake, max_new_tokens=5)
    assert got["em"] == 1.0 and got["f1"] == 1.0


@pytest.mark.parametrize("method", ["mezo", "lozo", "adamw"])
def test_train_on_a_chat_task_from_the_cli(chatdir, tmp_path, method, capsys):
    run = tmp_path / "run"
    lr = {"mezo": ["--mezo.lr", "1e-2", "--mezo.eps", "1e-2"], "lozo": ["--lozo.lr", "1e-2"]}
    lr["adamw"] = ["--adamw.lr", "1e-2"]
    argv = ["train", "--method", method, "--model.name", str(chatdir / "model")]
    argv += ["--data.task", str(chatdir / "chat.yaml")]
    argv += ["--train.steps", "4", "--train.batch_size", "4", "--train.eval_every", "2", "--train.progress", "false"]
    argv += ["--out", str(run), *lr[method]]
    assert cli(argv) == 0
    env = json.loads((run / "env.json").read_text())
    assert env["objective"] == "chat" and env["sizes"] == {"train": 40, "dev": 10, "test": 10}
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in steps if r["kind"] == "train")
    assert any(r["kind"] == "eval" and "f1" in r for r in steps)
    capsys.readouterr()
    assert cli(["eval", str(run), "--split", "dev", "--out", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["kind"] == "chat" and res["n"] == 10 and res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert "perplexity" in capsys.readouterr().out


def test_mezo_lowers_the_held_out_loss(chatdir, model_tok):
    """A ZO step on the chat loss moves the held-out loss down on the tiny model (the SmolLM2 check is in real)."""
    import zotune

    _, tok = model_tok
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chatdir / "model")
    spec = str(chatdir / "chat.yaml")
    splits = build_splits(DataConfig(task=spec, protocol="files"), resolve_task(spec))
    held_out = splits["dev"]
    with torch.no_grad():
        before = float(chat_lm_loss(model, tok, held_out))
    opt = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=0)
    for step in range(30):
        batch = [splits["train"][(step * 8 + j) % 40] for j in range(8)]
        opt.step(lambda b=batch: chat_lm_loss(model, tok, b))
    with torch.no_grad():
        after = float(chat_lm_loss(model, tok, held_out))
    assert after < before - 0.2  # measured: 5.68 -> 5.15


def test_demo_task_is_deterministic(tmp_path):
    a = write_task(tmp_path / "a", sizes={"train": 5, "dev": 2, "test": 2})
    b = write_task(tmp_path / "b", sizes={"train": 5, "dev": 2, "test": 2})
    assert (a.parent / "train.jsonl").read_text() == (b.parent / "train.jsonl").read_text()
    splits = build_splits(DataConfig(task=str(a), protocol="files"), resolve_task(str(a)))
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [5, 2, 2]
    cfg = run_config_from_dict({"data": {"task": str(a)}})
    assert cfg.data.task == str(a)


def test_run_and_train_api(chatdir, tmp_path):
    """The Python API: train(config) with a chat task, first-order, gives finite dev loss-based metrics."""
    tree = {
        "method": "adamw",
        "model": {"name": str(chatdir / "model")},
        "data": {"task": str(chatdir / "chat.yaml")},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "progress": False, "test": True},
        "adamw": {"lr": 1e-3},
        "out": str(tmp_path / "run"),
    }
    results = train(run_config_from_dict(tree))
    assert results["metric"] == "f1" and 0 <= results["test"] <= 1


def test_the_recipe_data_is_what_the_generator_writes(tmp_path):
    shipped = Path(__file__).parents[2] / "recipes" / "data" / "instruct"
    write_task(tmp_path)
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "task.yaml"):
        assert (shipped / name).read_text() == (tmp_path / name).read_text(), name
    splits = build_splits(DataConfig(task=str(shipped / "task.yaml")), resolve_task(str(shipped / "task.yaml")))
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [400, 50, 100]
