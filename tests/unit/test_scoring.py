"""Scoring, losses, ICL prompts, generation and metrics on tiny random models with an offline word-level tokenizer."""

from __future__ import annotations

import logging
import random

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from zotune.tasks.base import Example
from zotune.tasks.evaluate import accuracy_objective, evaluate, f1_objective
from zotune.tasks.icl import build_icl_prompt, sample_demos
from zotune.tasks.scoring import (
    answer_lm_loss,
    classification_loss,
    exact_match,
    f1_score,
    generate_answers,
    head_loss,
    normalize_answer,
    score_candidates,
    score_with_head,
)

WORDS = (
    "<pad> <s> </s> <unk> the a an cat dog sat on mat it was great terrible good bad very movie film is not".split()
)
WORDS += [f"w{i}" for i in range(VOCAB - len(WORDS))]  # every id of the tiny models decodes to a word


def make_tokenizer(side: str = "right", bos: bool = False, newline_id: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' 64 ids; ``newline_id`` makes that id decode to a newline."""
    words = list(WORDS)
    if newline_id is not None:
        words[newline_id] = "\n"
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.padding_side = side
    return tok


EXAMPLES = [
    Example("the cat sat on the mat it was", [" great", " very bad"], label=1),
    Example("a dog", [" good", " not good", " terrible"], label=0),
    Example("the film is not a movie it was very", [" good", " bad"], label=0),
    Example("it", [" was great", " was terrible film"], label=1),
]


def flat(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def hand_score(model, tok, prompt_ids: list[int], cand_ids: list[int]) -> float:
    """Mean log-prob of the candidate from one unpadded forward over the full logits."""
    seq = torch.tensor([prompt_ids + cand_ids])
    with torch.no_grad():
        logp = model(input_ids=seq).logits[0].float().log_softmax(-1)
    n = len(prompt_ids)
    return sum(logp[n + i - 1, c].item() for i, c in enumerate(cand_ids)) / len(cand_ids)


# ----------------------------------------------------------------------------------------------------------------
# score_candidates


@pytest.mark.parametrize("bos", [False, True])
def test_score_is_mean_log_prob_of_candidate_tokens(arch, bos):
    model, tok = tiny_model(arch), make_tokenizer(bos=bos)
    scores = score_candidates(model, tok, EXAMPLES, batch_size=3)
    prefix = [1] if bos else []
    for ex, row in zip(EXAMPLES, scores, strict=True):
        for cand, value in zip(ex.candidates, row, strict=True):
            assert value == pytest.approx(
                hand_score(model, tok, prefix + ids(tok, ex.prompt), ids(tok, cand)), abs=1e-5
            )


def test_candidate_tokens_are_its_own():
    tok = make_tokenizer(bos=True)
    # two-token candidates are scored as two tokens: a shorter candidate is not favoured by its length
    model = tiny_model("llama")
    ex = Example("it", [" was great"], label=0)
    want = hand_score(model, tok, [1] + ids(tok, "it"), ids(tok, " was great"))
    assert score_candidates(model, tok, [ex])[0][0] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_size_and_padding_side_invariance(arch, side):
    model = tiny_model(arch)
    ref_tok = make_tokenizer("right")
    one_at_a_time = [
        [
            score_candidates(model, ref_tok, [Example(ex.prompt, [c], label=0)], batch_size=1)[0][0]
            for c in ex.candidates
        ]
        for ex in EXAMPLES
    ]
    tok = make_tokenizer(side)
    for bs in (1, 2, 5, 16):
        got = score_candidates(model, tok, EXAMPLES, batch_size=bs)
        for row, want in zip(got, one_at_a_time, strict=True):
            assert row == pytest.approx(want, abs=1e-5)


def test_one_forward_per_batch():
    model, tok = tiny_model("llama"), make_tokenizer("left")
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    stats: dict = {}
    score_candidates(model, tok, EXAMPLES, batch_size=4, stats=stats)
    handle.remove()
    n_pairs = sum(len(ex.candidates) for ex in EXAMPLES)
    # one-token candidates of a prompt share one sequence (the prompt); longer ones get their own
    rows = {
        tuple(ids(tok, ex.prompt) + (c_ids if len(c_ids) > 1 else []))
        for ex in EXAMPLES
        for c_ids in (ids(tok, c) for c in ex.candidates)
    }
    assert len(rows) < n_pairs
    assert len(calls) == stats["n_forward"] == -(-len(rows) // 4)
    assert stats["n_pairs"] == n_pairs and stats["n_truncated"] == 0


def test_prompts_override():
    model, tok = tiny_model("gpt2"), make_tokenizer()
    other = ["dog " + ex.prompt for ex in EXAMPLES]
    moved = [Example(p, ex.candidates, ex.label) for p, ex in zip(other, EXAMPLES, strict=True)]
    assert score_candidates(model, tok, EXAMPLES, prompts=other) == score_candidates(model, tok, moved)


def test_calibration_subtracts_content_free_scores(arch):
    model, tok = tiny_model(arch), make_tokenizer("left")
    cf = "not a movie it was"
    raw = score_candidates(model, tok, EXAMPLES)
    free = score_candidates(model, tok, [Example(cf, ex.candidates, ex.label) for ex in EXAMPLES])
    cal = score_candidates(model, tok, EXAMPLES, calibrated=True, calibration_prompt=cf)
    for c, r, f in zip(cal, raw, free, strict=True):
        assert c == pytest.approx([a - b for a, b in zip(r, f, strict=True)], abs=1e-5)
    per_example = [cf] * len(EXAMPLES)
    again = score_candidates(model, tok, EXAMPLES, calibrated=True, calibration_prompt=per_example)
    assert flat(again) == pytest.approx(flat(cal), abs=1e-6)
    with pytest.raises(ValueError, match="content-free"):
        score_candidates(model, tok, EXAMPLES, calibrated=True)
    in_meta = [Example(ex.prompt, ex.candidates, ex.label, meta={"calibration_prompt": cf}) for ex in EXAMPLES]
    assert flat(score_candidates(model, tok, in_meta, calibrated=True)) == pytest.approx(flat(cal), abs=1e-6)


@pytest.mark.parametrize("bos", [False, True])
def test_truncation_cuts_prompt_from_left_keeps_candidate_and_counts(caplog, bos):
    model, tok = tiny_model("llama"), make_tokenizer("left", bos=bos)
    long = Example(" ".join(["the cat sat on the mat"] * 3) + " it was", [" great", " very bad"], label=0)
    short = EXAMPLES[1]
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="zotune.tasks.scoring"):
        got = score_candidates(model, tok, [long, short], max_length=10, stats=stats)
    assert stats["n_truncated"] == 1 and stats["n_truncated_pairs"] == 2
    assert "1 of 2 examples" in caplog.text
    prefix = [1] if bos else []
    p = ids(tok, long.prompt)
    for cand, value in zip(long.candidates, got[0], strict=True):
        c = ids(tok, cand)
        kept = p[len(p) - (10 - len(prefix) - len(c)) :]  # the end of the prompt: "... it was"
        assert kept[-2:] == ids(tok, "it was")
        assert value == pytest.approx(hand_score(model, tok, prefix + kept, c), abs=1e-5)
    assert got[1] == pytest.approx(score_candidates(model, tok, [short])[0], abs=1e-5)
    with pytest.raises(ValueError, match="no prompt token"):
        score_candidates(model, tok, [Example("it", [" was very very great"], label=0)], max_length=3 + bos)


def test_default_max_length_is_model_positions():
    model, tok = tiny_model("gpt2"), make_tokenizer()  # n_positions = 64
    stats: dict = {}
    score_candidates(model, tok, [Example("the cat " * 40, [" great"], label=0)], stats=stats)
    assert stats["n_truncated"] == 1


def test_bad_inputs():
    model, tok = tiny_model("llama"), make_tokenizer()
    with pytest.raises(ValueError, match="no candidates"):
        score_candidates(model, tok, [Example("q", answers=["a"], kind="generation")])
    with pytest.raises(ValueError, match="no tokens"):
        score_candidates(model, tok, [Example("the cat", [""], label=0)])
    with pytest.raises(ValueError, match="no BOS"):
        score_candidates(model, tok, [Example("", [" great"], label=0)])


# ----------------------------------------------------------------------------------------------------------------
# losses


def test_classification_loss_is_ce_over_scores_with_gradient(arch):
    model, tok = tiny_model(arch), make_tokenizer("left")
    scores = score_candidates(model, tok, EXAMPLES)
    want = sum(
        F.cross_entropy(torch.tensor([s]), torch.tensor([ex.label])).item()
        for s, ex in zip(scores, EXAMPLES, strict=True)
    ) / len(EXAMPLES)
    loss = classification_loss(model, tok, EXAMPLES)
    assert loss.ndim == 0 and loss.item() == pytest.approx(want, abs=1e-5)
    assert classification_loss(model, tok, EXAMPLES, batch_size=2).item() == pytest.approx(want, abs=1e-5)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # usable as a ZO closure
        assert float((lambda: classification_loss(model, tok, EXAMPLES))()) == pytest.approx(want, abs=1e-5)


def test_answer_lm_loss_masks_the_prompt(arch):
    model, tok = tiny_model(arch), make_tokenizer("right")
    exs = [
        Example("the cat sat", [" on the mat", " good"], label=0, kind="multiple_choice"),
        Example("a dog is", answers=[" very bad film", " x"], kind="generation"),
    ]
    total, count = 0.0, 0
    for ex in exs:
        p, c = ids(tok, ex.prompt), ids(tok, ex.gold)
        seq = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        with torch.no_grad():
            hf = model(input_ids=seq, labels=labels).loss.item()  # HF shifts labels; -100 masks the prompt
        total += hf * len(c)
        count += len(c)
    loss = answer_lm_loss(model, tok, exs)
    assert loss.item() == pytest.approx(total / count, abs=1e-5)
    assert answer_lm_loss(model, tok, exs, batch_size=1).item() == pytest.approx(total / count, abs=1e-5)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# in-context learning


def _demos(n: int) -> list[Example]:
    words = ["cat", "dog", "mat", "film"]
    return [Example(f"the {words[i % 4]} was", [" bad", " good"], label=i % 2) for i in range(n)]


def test_icl_keeps_all_demos_when_they_fit():
    tok = make_tokenizer()
    demos, query = _demos(3), EXAMPLES[0]
    built, kept = build_icl_prompt(demos, query, tok, max_length=None)
    assert kept == 3
    assert built.prompt == "\n\n".join(d.demonstration() for d in demos) + "\n\n" + query.prompt
    assert (built.candidates, built.label) == (query.candidates, query.label)


def test_icl_drops_farthest_demos_first_and_never_cuts_the_query():
    tok = make_tokenizer()
    demos, query = _demos(5), EXAMPLES[0]  # each demo is 4 tokens, the query 8, its longest candidate 2
    built, kept = build_icl_prompt(demos, query, tok, max_length=8 + 2 + 4 * 2)
    assert kept == 2
    assert built.prompt == "\n\n".join(d.demonstration() for d in demos[3:]) + "\n\n" + query.prompt
    assert len(ids(tok, built.prompt)) + 2 <= 18
    built, kept = build_icl_prompt(demos, query, tok, max_length=5)  # even the query alone is too long
    assert kept == 0 and built.prompt == query.prompt


def test_sample_demos_deterministic_balanced_and_rng_free():
    train = _demos(9) + [Example("the cat was", [" bad", " good"], label=1)] * 11
    random.seed(1)
    torch.manual_seed(1)
    state = (random.getstate(), torch.get_rng_state())
    a = sample_demos(train, 6, seed=3)
    assert (random.getstate(), torch.get_rng_state().equal(state[1])) == (state[0], True)
    assert a == sample_demos(train, 6, seed=3)
    assert sorted(d.label for d in a) == [0, 0, 0, 1, 1, 1]
    assert len(sample_demos(_demos(4), 4, seed=0)) == 4
    with pytest.raises(ValueError):
        sample_demos(_demos(2), 3, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# generation


def _generation_model(arch: str):
    model = tiny_model(arch)
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model


GEN = [Example("the cat sat on the mat it was", answers=["x"], kind="generation"), Example("a dog", answers=["y"])]


def _greedy_ids(model, tok, prompt: str, n: int) -> list[int]:
    seq = ids(tok, prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([seq + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == 2:
                break
    return out


def test_generation_is_greedy_batched_and_stops_at_max_new_tokens(arch):
    model, tok = _generation_model(arch), make_tokenizer("right")
    got = generate_answers(model, tok, GEN, stop=None, max_new_tokens=5, batch_size=2)
    for ex, text in zip(GEN, got, strict=True):
        want = _greedy_ids(model, tok, ex.prompt, 5)
        assert len([i for i in want if i != 2]) <= 5
        assert text == tok.decode(want, skip_special_tokens=True).strip()
    assert got == [generate_answers(model, tok, [ex], stop=None, max_new_tokens=5)[0] for ex in GEN]


def test_generation_stops_at_newline():
    model = _generation_model("llama")
    base = make_tokenizer()
    prompt = GEN[0].prompt
    greedy = _greedy_ids(model, base, prompt, 12)
    prompt_ids = set(ids(base, prompt))
    j = next(j for j in range(1, len(greedy)) if greedy[j] not in greedy[:j] + [2] and greedy[j] not in prompt_ids)
    tok = make_tokenizer(newline_id=greedy[j])  # the j-th generated token now decodes to "\n"
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    got = generate_answers(model, tok, [GEN[0]], max_new_tokens=12)
    handle.remove()
    assert got == [tok.decode(greedy[:j], skip_special_tokens=True).strip()]
    assert len(calls) == j + 1  # stopped right after the newline, not at max_new_tokens


# ----------------------------------------------------------------------------------------------------------------
# metrics


def test_squad_metrics():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert f1_score("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert f1_score("cat", ["dog", "a cat"]) == 1.0  # max over gold answers
    assert f1_score("blue whale", ["the whale shark"]) == pytest.approx(2 * 0.5 * 0.5 / 1.0)
    assert f1_score("", ["the"]) == 1.0 and f1_score("", ["cat"]) == 0.0
    assert exact_match("The Cat.", ["cat"]) == 1.0 and exact_match("cat sat", ["cat"]) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# encoder with a head


def _tiny_bert(num_labels: int = 3):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForSequenceClassification(cfg).eval()


def test_score_with_head():
    model, tok = _tiny_bert(), make_tokenizer("right")
    exs = [
        Example("ignored prompt", [" a", " b", " c"], label=0, meta={"text": "the cat sat on the mat"}),
        Example("a dog", [" a", " b", " c"], label=2),
        Example("x", [" a", " b", " c"], label=1, meta={"text": "the film " * 12}),
    ]
    stats: dict = {}
    got = score_with_head(model, tok, exs, batch_size=2, stats=stats)
    assert stats["n_truncated"] == 1  # 24 words > 16 positions
    for ex, row in zip(exs, got, strict=True):
        text = ex.meta.get("text", ex.prompt)
        enc = tok(text, return_tensors="pt", truncation=True, max_length=16)
        with torch.no_grad():
            want = model(**enc).logits[0].tolist()
        assert row == pytest.approx(want, abs=1e-5)
    result = evaluate(model, tok, exs)
    assert result["kind"] == "head" and result["n_truncated"] == 1
    hits = sum(max(range(3), key=r.__getitem__) == ex.label for r, ex in zip(got, exs, strict=True))
    assert result["accuracy"] == pytest.approx(hits / 3)


def test_head_loss_is_ce_of_head_logits_with_gradient():
    model, tok = _tiny_bert(), make_tokenizer("right")
    exs = [Example("a dog", [" a", " b", " c"], label=2), Example("the cat", [" a", " b", " c"], label=0)]
    logits = torch.tensor(score_with_head(model, tok, exs))
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0]))
    loss = head_loss(model, tok, exs, batch_size=1)
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    loss.backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="out of range for a head with 3 labels"):
        head_loss(model, tok, [Example("x", [" a"], label=5)])
    with pytest.raises(ValueError, match="labelled"):
        head_loss(model, tok, [Example("x", [" a"])])


# ----------------------------------------------------------------------------------------------------------------
# evaluate and objectives


def test_evaluate_classification_icl_and_objectives():
    model, tok = tiny_model("opt"), make_tokenizer("left")
    model.train()
    scores = score_candidates(model, tok, EXAMPLES)
    acc = sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, EXAMPLES, strict=True)) / 4
    result = evaluate(model, tok, EXAMPLES)
    assert model.training  # training mode restored
    assert result["accuracy"] == pytest.approx(acc) and result["n"] == 4 and result["n_truncated"] == 0
    assert set(result) >= {"kind", "n", "accuracy", "n_truncated", "k", "n_demos_kept", "seconds"}
    icl = evaluate(model, tok, EXAMPLES, demos=_demos(8), k=4, seed=0)
    assert icl["k"] == 4 and icl["n_demos_kept"] == 4
    tight = evaluate(model, tok, EXAMPLES, demos=_demos(8), k=4, seed=0, max_length=16)
    assert tight["n_demos_kept"] < 4
    obj = accuracy_objective(model, tok, EXAMPLES)
    assert obj.ndim == 0 and obj.item() == pytest.approx(-acc)


def test_evaluate_generation_and_f1_objective():
    model, tok = _generation_model("llama"), make_tokenizer("right")
    exs = [
        Example("the cat sat", answers=["x"], kind="generation"),
        Example("a dog", answers=["y"], kind="generation"),
    ]
    preds = generate_answers(model, tok, exs, max_new_tokens=4)
    golds = [[preds[0]], ["nothing matches"]]
    exs = [Example(ex.prompt, answers=g, kind="generation") for ex, g in zip(exs, golds, strict=True)]
    result = evaluate(model, tok, exs, max_new_tokens=4)
    assert result["kind"] == "generation"
    assert result["em"] == pytest.approx(0.5)  # the first gold is its own prediction, the second matches nothing
    assert f1_objective(model, tok, exs, max_new_tokens=4).item() == pytest.approx(-result["f1"])
