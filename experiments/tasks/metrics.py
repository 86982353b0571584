"""LongBench's metrics, re-implemented from their definitions, plus ``contains`` and HumanEval pass@1.

Every metric maps ``(prediction, ground_truth, all_classes) -> float`` in [0, 1]; a prompt's score
is the max over its reference answers (``score_prediction``), a task's score is 100 x the mean.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Mapping, Sequence

from experiments.tasks.registry import TaskError, get_spec

_ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese normalisation: lower case, drop Chinese and ASCII punctuation, drop all whitespace."""
    drop = set(_ZH_PUNCT) | set(string.punctuation)
    return "".join(ch for ch in s.lower() if ch not in drop and not ch.isspace())


def _jieba():
    try:
        import jieba
    except ImportError:
        raise TaskError("Chinese metrics need jieba: pip install 'namm-spec[zh]' (or pip install jieba)") from None
    jieba.setLogLevel(60)
    return jieba


def f1_tokens(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Token F1: P = |common| / |pred|, R = |common| / |gt|, F1 = 2PR / (P + R)."""
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(prediction), same / len(ground_truth)
    return 2 * p * r / (p + r)


def qa_f1(prediction: str, ground_truth: str, all_classes=None) -> float:
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh(prediction: str, ground_truth: str, all_classes=None) -> float:
    jieba = _jieba()
    pred = [normalize_zh_answer(t) for t in jieba.cut(prediction, cut_all=False)]
    gt = [normalize_zh_answer(t) for t in jieba.cut(ground_truth, cut_all=False)]
    return f1_tokens([t for t in pred if t], [t for t in gt if t])


def rouge(prediction: str, ground_truth: str, all_classes=None) -> float:
    """ROUGE-L F1 from the ``rouge`` package; an empty or unscorable hypothesis scores 0."""
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError):
        return 0.0


def rouge_zh(prediction: str, ground_truth: str, all_classes=None) -> float:
    jieba = _jieba()
    return rouge(" ".join(jieba.cut(prediction, cut_all=False)), " ".join(jieba.cut(ground_truth, cut_all=False)))


def classification(prediction: str, ground_truth: str, all_classes=None) -> float:
    """1/|matches| if the true class is among the class names found in the prediction, else 0.

    A matched class that is a strict substring of the true class does not count against it.
    """
    matches = [c for c in (all_classes or []) if c in prediction]
    matches = [c for c in matches if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _fraction_equal(numbers: list[str], target: str) -> float:
    return 0.0 if not numbers else sum(n == target for n in numbers) / len(numbers)


def count(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Share of the numbers in the prediction that equal the true count."""
    return _fraction_equal(re.findall(r"\d+", prediction), str(ground_truth))


def retrieval(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Share of the numbers in the prediction that equal k of the true "Paragraph k"."""
    k = re.findall(r"Paragraph (\d+)", ground_truth)
    return _fraction_equal(re.findall(r"\d+", prediction), k[0]) if k else 0.0


def retrieval_zh(prediction: str, ground_truth: str, all_classes=None) -> float:
    k = re.findall(r"段落(\d+)", ground_truth)
    return _fraction_equal(re.findall(r"\d+", prediction), k[0]) if k else 0.0


def first_code_line(prediction: str) -> str:
    """The first line that is not a comment or a code fence (LongBench: no '`', '#' or '//')."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's integer ratio: round(100 * indel similarity); 0 when either string is empty."""
    from rapidfuzz import fuzz

    if not a or not b:
        return 0
    return int(round(fuzz.ratio(a, b)))


def code_sim(prediction: str, ground_truth: str, all_classes=None) -> float:
    return fuzz_ratio(first_code_line(prediction), ground_truth) / 100


def contains(prediction: str, ground_truth: str, all_classes=None) -> float:
    """1 if the answer string occurs in the prediction (pass key, key-value retrieval)."""
    return float(bool(ground_truth) and ground_truth in prediction)


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "rouge": rouge, "rouge_zh": rouge_zh,
    "classification": classification, "count": count, "retrieval": retrieval,
    "retrieval_zh": retrieval_zh, "code_sim": code_sim, "contains": contains,
}


def score_prediction(dataset: str, prediction: str, row: Mapping, timeout: float = 3.0) -> float:
    """One prompt's score in [0, 1]: the dataset's metric, max over ``row["answers"]``.

    trec, triviaqa, samsum and lsht score only the first line (after leading newlines).
    ``humaneval`` runs prompt + completion + tests in a subprocess (pass@1 of one greedy sample).
    """
    spec = get_spec(dataset)
    if spec.metric == "pass_at_1":
        from experiments.tasks.humaneval import check

        return float(check(row, prediction, timeout=timeout)["passed"])
    metric = METRICS[spec.metric]
    if spec.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    answers = row.get("answers") or []
    classes = row.get("all_classes") or []
    return max((metric(prediction, gt, all_classes=classes) for gt in answers), default=0.0)
