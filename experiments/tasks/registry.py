"""One registry: dataset name -> metric, max_new_tokens, category, prompt handling.

LongBench's 21 tasks follow its ``dataset2maxlen`` and metric table; the built-in tasks are ours.
``chat=False`` marks tasks that LongBench feeds as raw completion even to chat models (few-shot and
code). HumanEval is raw completion of the function head for base models and a request for the whole
function for instruct models (template ``humaneval@chat``, pass@1 on the code block of the answer).
"""

from __future__ import annotations

from dataclasses import dataclass


class TaskError(ValueError):
    """A task that cannot be built or loaded as asked (unknown name, bad file, bad row)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    metric: str
    max_new_tokens: int
    category: str
    chat: bool = True          # apply the chat template for instruct models
    first_line: bool = False   # score only the first line of the prediction (trec, triviaqa, samsum, lsht)
    stop: tuple[str, ...] = ()  # stop strings for generation; the prediction is cut at the first one
    chat_stop: tuple[str, ...] | None = None  # stop strings when the chat template applies (None: ``stop``)

    def stops(self, chat: bool) -> tuple[str, ...]:
        """Stop strings of a prompt built with (``chat``) or without the chat template."""
        return self.chat_stop if chat and self.chat_stop is not None else self.stop


HUMANEVAL_STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # Chen et al. 2021, HumanEval paper

_SPECS = [
    # LongBench: Single-Doc QA
    TaskSpec("narrativeqa", "qa_f1", 128, "Single-Doc QA"),
    TaskSpec("qasper", "qa_f1", 128, "Single-Doc QA"),
    TaskSpec("multifieldqa_en", "qa_f1", 64, "Single-Doc QA"),
    TaskSpec("multifieldqa_zh", "qa_f1_zh", 64, "Single-Doc QA"),
    # Multi-Doc QA
    TaskSpec("hotpotqa", "qa_f1", 32, "Multi-Doc QA"),
    TaskSpec("2wikimqa", "qa_f1", 32, "Multi-Doc QA"),
    TaskSpec("musique", "qa_f1", 32, "Multi-Doc QA"),
    TaskSpec("dureader", "rouge_zh", 128, "Multi-Doc QA"),
    # Summarization
    TaskSpec("gov_report", "rouge", 512, "Summarization"),
    TaskSpec("qmsum", "rouge", 512, "Summarization"),
    TaskSpec("multi_news", "rouge", 512, "Summarization"),
    TaskSpec("vcsum", "rouge_zh", 512, "Summarization"),
    # Few-shot (raw completion in LongBench, first line scored)
    TaskSpec("trec", "classification", 64, "Few-shot", chat=False, first_line=True),
    TaskSpec("triviaqa", "qa_f1", 32, "Few-shot", chat=False, first_line=True),
    TaskSpec("samsum", "rouge", 128, "Few-shot", chat=False, first_line=True),
    TaskSpec("lsht", "classification", 64, "Few-shot", chat=False, first_line=True),
    # Synthetic
    TaskSpec("passage_count", "count", 32, "Synthetic"),
    TaskSpec("passage_retrieval_en", "retrieval", 32, "Synthetic"),
    TaskSpec("passage_retrieval_zh", "retrieval_zh", 32, "Synthetic"),
    # Code (raw completion)
    TaskSpec("lcc", "code_sim", 64, "Code", chat=False),
    TaskSpec("repobench-p", "code_sim", 64, "Code", chat=False),
    # Built-in synthetic tasks (passage_retrieval_en and lcc above double as built-ins)
    TaskSpec("passkey", "contains", 16, "Synthetic"),
    TaskSpec("needle_qa", "contains", 32, "Synthetic"),  # one-word answers; qa_f1 would grade verbosity
    TaskSpec("kv_retrieval", "contains", 64, "Synthetic"),
    # base models complete the raw function head; instruct models are asked for the function in a code
    # block (template "humaneval@chat"), cut where the block closes
    TaskSpec("humaneval", "pass_at_1", 384, "Code", stop=HUMANEVAL_STOP, chat_stop=("\n```",)),
]

REGISTRY: dict[str, TaskSpec] = {s.name: s for s in _SPECS}

LONGBENCH_TASKS: tuple[str, ...] = tuple(s.name for s in _SPECS[:21])
BUILTIN_TASKS: tuple[str, ...] = ("passkey", "needle_qa", "kv_retrieval", "passage_retrieval_en", "lcc", "humaneval")


def get_spec(name: str) -> TaskSpec:
    """The registry entry for a dataset name, or a one-line error listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TaskError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))} "
                        f"(add it to experiments/tasks/registry.py)") from None
