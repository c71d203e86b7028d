"""Zero-shot SST-2 with the real default model: MeZO's template scores above chance, batch-size independent."""

from __future__ import annotations

import pytest
from real_support import require_or_skip

from zotune.tasks import DataNotFoundError, read_sst2
from zotune.tasks.base import Example
from zotune.tasks.evaluate import evaluate
from zotune.tasks.scoring import f1_score, generate_answers, score_candidates

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def sst2_dev() -> list[Example]:
    try:
        rows = read_sst2("dev", limit=32)
    except DataNotFoundError as err:
        require_or_skip(False, str(err))
    return [Example(f"{r['sentence']} It was", [" terrible", " great"], label=r["label"]) for r in rows]


def test_zero_shot_sst2_above_chance_and_batch_independent(smollm2, sst2_dev):
    model, tokenizer = smollm2
    many = score_candidates(model, tokenizer, sst2_dev, batch_size=16)
    one = score_candidates(model, tokenizer, sst2_dev[:12], batch_size=1)  # one pair per forward: the slow part
    for a, b in zip(one, many[:12], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    # Uncalibrated, SmolLM2-135M says " great" for almost everything (29 of these 32; accuracy ~0.47), but its
    # margin still ranks positives above negatives; content-free calibration (MeZO's SFC) turns that into accuracy.
    margins = [great - terrible for terrible, great in many]
    pos = [m for m, ex in zip(margins, sst2_dev, strict=True) if ex.label == 1]
    neg = [m for m, ex in zip(margins, sst2_dev, strict=True) if ex.label == 0]
    auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auc > 0.6, auc
    result = evaluate(model, tokenizer, sst2_dev, batch_size=16, calibrated=True, calibration_prompt="N/A It was")
    assert result["n"] == 32 and result["n_truncated"] == 0
    assert result["accuracy"] > 0.5, result


def test_left_padding_matches_right_padding(smollm2, sst2_dev):
    model, tokenizer = smollm2
    right = score_candidates(model, tokenizer, sst2_dev[:8], batch_size=8)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if side == "right" else "right"
    try:
        left = score_candidates(model, tokenizer, sst2_dev[:8], batch_size=8)
    finally:
        tokenizer.padding_side = side
    for a, b in zip(right, left, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_greedy_generation_batched_equals_one_at_a_time(smollm2):
    model, tokenizer = smollm2
    examples = [
        Example(
            "Title: France\nContext: Paris is the capital of France.\n"
            "Question: What is the capital of France?\nAnswer:",
            answers=["Paris"],
            kind="generation",
        ),
        Example(
            "Passage: The sky is blue.\nQuestion: What color is the sky?\nAnswer:", answers=["blue"], kind="generation"
        ),
    ]
    batched = generate_answers(model, tokenizer, examples, max_new_tokens=20, batch_size=2)
    assert batched == [generate_answers(model, tokenizer, [ex], max_new_tokens=20)[0] for ex in examples]
    assert all("\n" not in answer for answer in batched)
    assert f1_score(batched[0], ["Paris"]) > 0
