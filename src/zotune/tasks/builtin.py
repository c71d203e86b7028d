"""The built-in tasks: MeZO's suite with MeZO's causal-LM templates, and the LM-BFF sentence tasks.

Templates reproduce MeZO ``large_models/templates.py`` exactly: for each candidate, ``prompt + candidate`` is the
string MeZO scores (``verbalize(...)``), and ``prompt`` is MeZO's ``encode(...)``, both with spaces stripped at the
ends as MeZO's ``encode_prompt`` does. So a candidate carries a leading space when the prompt ends in a word
(SST-2 ``" great"``, COPA ``" the sun was rising."``, ReCoRD ``" <query with the entity>"``) and none when the
prompt ends in a newline (RTE, CB, BoolQ, WSC, WiC, MultiRC: ``"Yes"``, exactly MeZO's ``...Yes or No?\\nYes``).

Each example's ``meta`` holds the raw fields (as read: hub field names, or the file's own, e.g. GLUE RTE's
``sentence1``), normalized ones where the raw names differ (``text`` for single-sentence tasks, ``premise`` /
``hypothesis`` for RTE), and the provenance ``file`` and ``line`` (1-based; hub rows: ``hf:<dataset>:<split>`` and the
row number), plus ``question_index`` / ``answer_index`` (MultiRC) or ``query_index`` (ReCoRD).

Choices beyond MeZO (documented on each task's ``description``):

- BoolQ uses MeZO's default BoolQ template (``template_version=2``, class ``BoolQTemplateV3``):
  ``"<passage> <Question>?\\n"`` then ``Yes`` / ``No``.
- ReCoRD uses the template MeZO's ReCoRD task actually runs (``ReCoRDTemplateGPT3``): ``"<passage>\\n-"`` with
  ``@highlight\\n`` written as ``- ``, continued by ``" " + query`` with ``@placeholder`` replaced by each entity.
  (algorithms.md §0 lists the unused ``ReCoRDTemplate``.) Candidates = the entities, deduplicated and sorted as on the
  hub; gold = the first (sorted) answer entity; ``meta["answers"]`` keeps all of them.
- SQuAD / DROP answers carry a leading space (``" Denver Broncos"``): ``prompt + answer`` is MeZO's demonstration.
- LM-BFF tasks have no MeZO causal template; ours: SST-5, MR, CR, MPQA, IMDB ``"<text> It was"`` (SST-5:
  terrible / bad / okay / good / great, LM-BFF's words; the others terrible / great), Subj ``"<text> This is"``
  (subjective / objective), TREC ``"Question: <text>\\nAnswer type:"`` (Description / Entity / Expression / Human /
  Location / Number, LM-BFF's words for labels 0..5 = DESC, ENTY, ABBR, HUM, LOC, NUM).

Example:
    >>> from zotune.tasks.builtin import BUILTIN
    >>> task = BUILTIN["rte"]
    >>> ex = task.to_example({"premise": "A cat sat.", "hypothesis": "A cat", "label": "entailment"})
    >>> ex.prompt + ex.candidates[ex.label]
    'A cat sat.\\nDoes this mean that "A cat" is true? Yes or No?\\nYes'
    >>> task.calibration_prompt
    'N/A\\nDoes this mean that "N/A" is true? Yes or No?\\n'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .base import Example, Task
from .readers import field, raw_fields, where

CONTENT_FREE = "N/A"


def _meta(row: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The raw fields, normalized extras (e.g. ``text``), then the provenance (``file``, ``line``, ...) on top."""
    return {**raw_fields(row), **extra, **(row.get("meta") or {})}


def _text(row: dict[str, Any]) -> dict[str, Any]:
    return {"text": str(field(row, "sentence", "text")).strip()}


def _pair(row: dict[str, Any]) -> dict[str, Any]:
    return {"premise": field(row, "premise", "sentence1"), "hypothesis": field(row, "hypothesis", "sentence2")}


def _split_candidates(prompt: str, fulls: Sequence[str]) -> tuple[str, list[str]]:
    """MeZO's (encode, verbalize) pair -> (prompt, continuations): both stripped of spaces at the ends."""
    prompt = prompt.strip(" ")
    out = []
    for full in fulls:
        full = full.strip(" ")
        assert full.startswith(prompt), (prompt, full)
        out.append(full[len(prompt) :])
    return prompt, out


def _label_index(row: dict[str, Any], mapping: dict[Any, int], name: str = "label") -> int:
    value = field(row, name)
    key = value.strip() if isinstance(value, str) else value
    if isinstance(key, str) and key.lstrip("-").isdigit() and key not in mapping:
        key = int(key)
    if isinstance(key, bool):
        key = int(key)
    if key not in mapping:
        allowed = ", ".join(repr(k) for k in mapping)
        raise ValueError(f"{where(row)}: field {name!r}: label {value!r} is not one of the allowed labels: {allowed}")
    return mapping[key]


def _classification(
    name: str,
    encode: Callable[[dict[str, Any]], str],
    words: Sequence[str],
    labels: dict[Any, int],
    content_free: dict[str, str],
    *,
    label_field: str = "label",
    label_alternatives: Sequence[str] = (),
    canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **task_kwargs: Any,
) -> Task:
    """A fixed-verbalizer task: ``encode(row) + word`` is the scored string; ``labels`` maps raw labels to indices."""

    def to_example(row: dict[str, Any]) -> Example:
        prompt, candidates = _split_candidates(encode(row), [encode(row) + w for w in words])
        label = None
        present = [k for k in (label_field, *label_alternatives) if row.get(k) is not None]
        if present:
            label = _label_index(row, labels, present[0])
        meta = _meta(row, **(canonical(row) if canonical else {}))
        return Example(prompt=prompt, candidates=candidates, label=label, kind="classification", meta=meta)

    calib = encode(content_free).strip(" ")
    verbalizer = _split_candidates(encode(content_free), [encode(content_free) + w for w in words])[1]
    return Task(
        name=name,
        kind="classification",
        metric="accuracy",
        to_example=to_example,
        verbalizer=verbalizer,
        calibration_prompt=calib,
        **task_kwargs,
    )


YES_NO = {1: 0, 0: 1, "true": 0, "false": 1, "True": 0, "False": 1}  # bools are looked up as 1 / 0
NO_YES = {0: 0, 1: 1, "false": 0, "true": 1, "False": 0, "True": 1}

# ---------------------------------------------------------------- GLUE / SuperGLUE classification (MeZO templates)


def _sst2(r: dict[str, Any]) -> str:
    return f"{str(field(r, 'sentence', 'text')).strip()} It was"


def _rte(r: dict[str, Any]) -> str:
    premise, hyp = field(r, "premise", "sentence1"), field(r, "hypothesis", "sentence2")
    return f'{premise}\nDoes this mean that "{hyp}" is true? Yes or No?\n'


def _cb(r: dict[str, Any]) -> str:
    return f'Suppose {field(r, "premise")} Can we infer that "{field(r, "hypothesis")}"? Yes, No, or Maybe?\n'


def _boolq(r: dict[str, Any]) -> str:
    question = str(field(r, "question"))
    if not question.endswith("?"):
        question += "?"
    question = question[:1].upper() + question[1:]
    return f"{field(r, 'passage')} {question}\n"


def _wsc(r: dict[str, Any]) -> str:
    target = r.get("target") if isinstance(r.get("target"), dict) else {}
    flat = r | {k: v for k, v in target.items() if k not in r}
    span1, span2 = field(flat, "span1_text"), str(field(flat, "span2_text"))
    question = f'In the previous sentence, does the pronoun "{span2.lower()}" refer to {span1}? Yes or No?'
    return f"{field(r, 'text')}\n{question}\n"


def _wic(r: dict[str, Any]) -> str:
    word, s1, s2 = field(r, "word"), field(r, "sentence1"), field(r, "sentence2")
    return f'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{s1}\n{s2}\n'


def _multirc(r: dict[str, Any]) -> str:
    p, q, a = field(r, "paragraph"), field(r, "question"), field(r, "answer")
    return f'{p}\nQuestion: {q}\nI found this answer "{a}". Is that correct? Yes or No?\n'


_NA = CONTENT_FREE
_SG = "super_glue"


def _superglue_local(folder: str, fmt: str = "jsonl", validation: bool = True) -> dict[str, tuple[str, str]]:
    local = {"train": (f"superglue/{folder}/train.jsonl", fmt), "dev": (f"superglue/{folder}/dev32.jsonl", fmt)}
    if validation:
        local["validation"] = (f"superglue/{folder}/val.jsonl", fmt)
    return local


def _build() -> dict[str, Task]:
    t: dict[str, Task] = {}
    t["sst2"] = _classification(
        "sst2",
        _sst2,
        [" terrible", " great"],
        {0: 0, 1: 1},
        {"sentence": _NA},
        canonical=_text,
        hub=("glue", "sst2"),
        local={"train": ("glue/SST-2/train.tsv", "glue_tsv"), "validation": ("glue/SST-2/dev.tsv", "glue_tsv")},
        description="SST-2 (GLUE) sentiment; MeZO template '<sentence> It was' + terrible/great",
    )
    t["rte"] = _classification(
        "rte",
        _rte,
        ["Yes", "No"],
        {0: 0, 1: 1, "entailment": 0, "not_entailment": 1},
        {"premise": _NA, "hypothesis": _NA},
        canonical=_pair,
        hub=(_SG, "rte"),
        # the full RTE train set (2,490) is GLUE's; GLUE dev.tsv = SuperGLUE val.jsonl (277)
        local={
            "train": ("glue/RTE/train.tsv", "glue_tsv"),
            "dev": ("superglue/RTE/dev32.jsonl", "jsonl"),
            "validation": ("glue/RTE/dev.tsv", "glue_tsv"),
        },
        description="RTE entailment (0/'entailment' -> Yes); MeZO template, Yes/No",
    )
    t["cb"] = _classification(
        "cb",
        _cb,
        ["Yes", "No", "Maybe"],
        {0: 0, 1: 1, 2: 2, "entailment": 0, "contradiction": 1, "neutral": 2},
        {"premise": _NA, "hypothesis": _NA},
        hub=(_SG, "cb"),
        local=_superglue_local("CB"),
        description="CommitmentBank (SuperGLUE): entailment/contradiction/neutral -> Yes/No/Maybe; MeZO template",
    )
    t["boolq"] = _classification(
        "boolq",
        _boolq,
        ["Yes", "No"],
        YES_NO,
        {"passage": _NA, "question": _NA},
        label_alternatives=("answer",),
        hub=("boolq", None),
        local=_superglue_local("BoolQ"),
        description="BoolQ yes/no QA; MeZO's default template '<passage> <Question>?\\n' (BoolQTemplateV3), Yes/No",
    )
    t["wsc"] = _classification(
        "wsc",
        _wsc,
        ["No", "Yes"],
        NO_YES,
        {"text": _NA, "span1_text": _NA, "span2_text": _NA},
        hub=(_SG, "wsc.fixed"),
        local=_superglue_local("WSC"),
        description="Winograd schema (SuperGLUE wsc.fixed): does the pronoun refer to span1? No/Yes; MeZO template",
    )
    t["wic"] = _classification(
        "wic",
        _wic,
        ["No", "Yes"],
        NO_YES,
        {"word": _NA, "sentence1": _NA, "sentence2": _NA},
        hub=(_SG, "wic"),
        local=_superglue_local("WiC"),
        description="Word-in-Context (SuperGLUE): same meaning? No/Yes; MeZO template",
    )
    t["multirc"] = _classification(
        "multirc",
        _multirc,
        ["No", "Yes"],
        {0: 0, 1: 1},
        {"paragraph": _NA, "question": _NA, "answer": _NA},
        hub=(_SG, "multirc"),
        local=_superglue_local("MultiRC", "multirc_jsonl"),
        description="MultiRC (SuperGLUE), one example per answer: is the answer correct? No/Yes; MeZO template",
    )
    t["copa"] = Task(
        name="copa",
        kind="multiple_choice",
        metric="accuracy",
        to_example=_copa_example,
        train_as_classification=False,
        hub=(_SG, "copa"),
        local=_superglue_local("COPA"),
        description="COPA (SuperGLUE): '<premise w/o .> so|because' + lower-cased choice; MeZO template",
    )
    t["record"] = Task(
        name="record",
        kind="multiple_choice",
        metric="accuracy",
        to_example=_record_example,
        train_as_classification=False,
        hub=(_SG, "record"),
        local=_superglue_local("ReCoRD", "record_jsonl", validation=False),
        description="ReCoRD (SuperGLUE) cloze over the passage entities; MeZO's ReCoRDTemplateGPT3",
    )
    t["squad"] = Task(
        name="squad",
        kind="generation",
        metric="f1",
        to_example=_squad_example,
        train_as_classification=False,
        hub=("squad", None),
        description="SQuAD v1.1 extractive QA, generated answer, token F1; MeZO template 'Title:..Context:..'",
    )
    t["drop"] = Task(
        name="drop",
        kind="generation",
        metric="f1",
        to_example=_drop_example,
        train_as_classification=False,
        hub=("drop", None),
        description="DROP discrete reasoning QA, generated answer, token F1; MeZO template 'Passage:..Question:..'",
    )
    # ------------------------------------------------------------ LM-BFF sentence tasks (our causal templates)
    sentiment = [" terrible", " great"]
    t["sst5"] = _classification(
        "sst5",
        _sst2,
        [" terrible", " bad", " okay", " good", " great"],
        {i: i for i in range(5)},
        {"text": _NA},
        canonical=_text,
        hub=("SetFit/sst5", None),
        local={
            "train": ("lm-bff/stsa.fine.train", "lmbff"),
            "dev": ("lm-bff/stsa.fine.dev", "lmbff"),
            "test": ("lm-bff/stsa.fine.test", "lmbff"),
        },
        description="SST-5 (LM-BFF) 5-way sentiment; '<text> It was' + terrible/bad/okay/good/great (LM-BFF words)",
    )
    t["trec"] = _classification(
        "trec",
        lambda r: f"Question: {str(field(r, 'text')).strip()}\nAnswer type:",
        [" Description", " Entity", " Expression", " Human", " Location", " Number"],
        {i: i for i in range(6)},
        {"text": _NA},
        canonical=_text,
        label_alternatives=("coarse_label",),
        hub=("trec", None),
        local={"train": ("lm-bff/TREC.train.all", "lmbff"), "test": ("lm-bff/TREC.test.all", "lmbff")},
        description="TREC question type (6 coarse classes, LM-BFF words); 'Question: <text>\\nAnswer type:'",
    )
    for name, hub, what in (
        ("mr", ("rotten_tomatoes", None), "MR movie-review sentiment"),
        ("cr", ("SetFit/SentEval-CR", None), "CR customer-review sentiment"),
        ("mpqa", ("SetFit/mpqa", None), "MPQA opinion polarity"),
    ):
        t[name] = _classification(
            name,
            _sst2,
            sentiment,
            {0: 0, 1: 1},
            {"text": _NA},
            canonical=_text,
            hub=hub,
            local={s: (f"lm-bff/{name}.{s}", "lmbff") for s in ("train", "dev", "test")},
            description=f"{what} (LM-BFF '<label> <text>' files, bring your own); '<text> It was' + terrible/great",
        )
    t["subj"] = _classification(
        "subj",
        lambda r: f"{str(field(r, 'text', 'sentence')).strip()} This is",
        [" subjective", " objective"],
        {0: 0, 1: 1},
        {"text": _NA},
        canonical=_text,
        hub=("SetFit/subj", None),
        local={s: (f"lm-bff/subj.{s}", "lmbff") for s in ("train", "dev", "test")},
        description="Subj subjectivity (LM-BFF files, bring your own); '<text> This is' + subjective/objective",
    )
    t["imdb"] = _classification(
        "imdb",
        _sst2,
        sentiment,
        {0: 0, 1: 1},
        {"text": _NA},
        canonical=_text,
        hub=("imdb", None),
        local={"train": ("imdb/train.jsonl.gz", "jsonl.gz"), "test": ("imdb/test.jsonl.gz", "jsonl.gz")},
        description="IMDB long movie reviews (1 = positive); '<text> It was' + terrible/great",
    )
    return t


# ---------------------------------------------------------------- multiple choice and generation


def _copa_prompt(r: dict[str, Any]) -> str:
    premise = str(field(r, "premise")).rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    question = field(r, "question")
    if question not in ("cause", "effect"):
        raise ValueError(f"{where(r)}: field 'question': {question!r} is not one of 'cause', 'effect'")
    return premise + (" so " if question == "effect" else " because ")


def _copa_choice(c: str) -> str:
    words = c.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def _copa_example(row: dict[str, Any]) -> Example:
    encoded = _copa_prompt(row)
    choices = [str(field(row, "choice1")), str(field(row, "choice2"))]
    prompt, candidates = _split_candidates(encoded, [encoded + _copa_choice(c) for c in choices])
    label = None
    if row.get("label") is not None:
        label = _label_index(row, {0: 0, 1: 1})
    return Example(prompt=prompt, candidates=candidates, label=label, kind="multiple_choice", meta=_meta(row))


def _record_example(row: dict[str, Any]) -> Example:
    passage = str(field(row, "passage")).replace("@highlight\n", "- ")
    query = str(field(row, "query"))
    entities = list(dict.fromkeys(field(row, "entities")))  # dedupe, keep order (the hub's order is sorted)
    if not entities:
        raise ValueError(f"{where(row)}: field 'entities': no candidate entities")
    answers = list(row.get("answers") or [])
    encoded = f"{passage}\n-"
    prompt, candidates = _split_candidates(
        encoded, [f"{passage}\n- {query.replace('@placeholder', e)}" for e in entities]
    )
    label = None
    if answers:
        gold = [a for a in answers if a in entities]
        if not gold:
            raise ValueError(f"{where(row)}: field 'answers': none of {answers!r} is a passage entity")
        label = entities.index(gold[0])
    meta = _meta(row, entities=entities, answers=answers)
    return Example(prompt=prompt, candidates=candidates, label=label, kind="multiple_choice", meta=meta)


def _answers(row: dict[str, Any], value: Any, name: str) -> list[str]:
    if isinstance(value, dict):  # hub: {"text": [...]} (SQuAD) or {"spans": [...]} (DROP)
        value = value.get("text", value.get("spans"))
    if isinstance(value, str):
        value = [value]
    if not value:
        raise ValueError(f"{where(row)}: field {name!r}: no gold answer")
    return [" " + str(a).strip() for a in value]


def _squad_example(row: dict[str, Any]) -> Example:
    title, context, question = field(row, "title"), field(row, "context"), str(field(row, "question")).strip()
    prompt = f"Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:"
    answers = _answers(row, field(row, "answers"), "answers")
    return Example(prompt=prompt, answers=answers, kind="generation", meta=_meta(row))


def _drop_example(row: dict[str, Any]) -> Example:
    context, question = field(row, "passage", "context"), str(field(row, "question")).strip()
    prompt = f"Passage: {context}\nQuestion: {question}\nAnswer:"
    answers = _answers(row, field(row, "answers_spans", "answers"), "answers_spans")
    return Example(prompt=prompt, answers=answers, kind="generation", meta=_meta(row))


BUILTIN: dict[str, Task] = _build()

# hub split names per task (our split -> the hub's); tasks not listed use train/validation/test as is
HUB_SPLITS: dict[str, dict[str, str]] = {
    "sst5": {"train": "train", "dev": "validation", "test": "test"},
    "trec": {"train": "train", "test": "test"},
    "mr": {"train": "train", "dev": "validation", "test": "test"},
    "cr": {"train": "train", "test": "test"},
    "mpqa": {"train": "train", "test": "test"},
    "subj": {"train": "train", "test": "test"},
    "imdb": {"train": "train", "test": "test"},
}
DEFAULT_HUB_SPLITS = {"train": "train", "validation": "validation"}
