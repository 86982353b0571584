"""Prompt templates and prompt building: chat template vs raw completion, middle truncation.

A template is one string with ``{context}`` and (optionally) ``{input}``; everything up to the end
of ``{context}`` is the *context* part, the rest the *question* part. The built-in templates live in
``templates.json``; a user JSON file ``{dataset: template}`` (e.g. LongBench's official
``dataset2prompt.json``) overrides them.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from experiments.tasks.registry import TaskError, get_spec

log = logging.getLogger(__name__)

TEMPLATES_FILE = Path(__file__).with_name("templates.json")


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt: ``context_ids + question_ids`` is the whole prompt.

    ``context_ids`` is everything up to the question (chat header, instruction, context);
    ``question_ids`` is the question/instruction tail incl. the chat template's assistant header.
    """
    context_ids: list[int]
    question_ids: list[int]
    truncated: bool = False
    n_tokens_before_truncation: int = 0
    chat: bool = False

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.question_ids

    def __len__(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


def _read_templates(path: str) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise TaskError(f"cannot read prompt templates {path}: {e.strerror}; pass an existing JSON file") from None
    except json.JSONDecodeError as e:
        raise TaskError(f"prompt templates {path} are not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise TaskError(f"prompt templates {path} must be a JSON object {{dataset: template string}}")
    return data


@functools.lru_cache(maxsize=1)
def _builtin_templates() -> dict[str, str]:
    return _read_templates(str(TEMPLATES_FILE))


def load_templates(path: str | Path | None = None) -> dict[str, str]:
    """Built-in templates, overridden per dataset by the user file at ``path`` (if given)."""
    out = dict(_builtin_templates())
    if path:
        out.update(_read_templates(str(Path(path).expanduser())))
    return out


def split_template(template: str) -> tuple[str, str]:
    """(head, tail): head ends right after ``{context}``, tail holds the question."""
    at = template.find("{context}")
    if at < 0:
        raise TaskError(f"prompt template has no {{context}} field: {template[:60]!r}")
    cut = at + len("{context}")
    return template[:cut], template[cut:]


def render_text(dataset: str, context: str, question: str, templates: Mapping[str, str] | None = None
                ) -> tuple[str, str]:
    """The prompt text split into (context part, question part)."""
    templates = templates or load_templates()
    if dataset not in templates:
        raise TaskError(f"no prompt template for dataset {dataset!r}; add one to a templates JSON file "
                        f"(templates=FILE)")
    head, tail = split_template(templates[dataset])
    fill = lambda s: s.replace("{context}", context).replace("{input}", question)  # noqa: E731
    return fill(head), fill(tail)


def _bos(tokenizer) -> list[int]:
    """[BOS] when the tokenizer itself starts sequences with it (Llama, the tiny tokenizer), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer.encode("a", add_special_tokens=True)[:1] == [bos] else []


def render_raw(dataset: str, context: str, question: str, tokenizer,
               templates: Mapping[str, str] | None = None) -> list[int]:
    """Token ids of the raw-completion prompt (BOS + text)."""
    ctx, q = render_text(dataset, context, question, templates)
    return _bos(tokenizer) + tokenizer.encode(ctx + q, add_special_tokens=False)


def middle_truncate(ids: Sequence[int], budget: int) -> list[int]:
    """Keep the first ``budget // 2`` and the last ``budget - budget // 2`` tokens (LongBench)."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    half = budget // 2
    return ids[:half] + (ids[len(ids) - (budget - half):] if budget - half > 0 else [])


def build_prompt(row: Mapping, tokenizer, chat: bool, max_prompt_tokens: int | None = None,
                 templates: Mapping[str, str] | None = None) -> Prompt:
    """Tokenise a task row: chat template for instruct models (where the task allows it), else raw
    completion with BOS; the context part is middle-truncated to fit ``max_prompt_tokens``."""
    spec = get_spec(row["dataset"])
    use_chat = bool(chat and spec.chat)
    key = row["dataset"]
    if use_chat and f"{key}@chat" in (templates or load_templates()):
        key = f"{key}@chat"  # a task whose instruct-model prompt differs from its raw one (humaneval)
    ctx_text, q_text = render_text(key, row["context"], row.get("input") or "", templates)
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise TaskError("model.chat=true but the tokenizer has no chat template; set model.chat=false")
        user = ctx_text + q_text
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
        at = rendered.find(user)
        if at < 0:
            raise TaskError(f"{row['dataset']}: the chat template rewrites the user message; cannot split the prompt")
        cut = at + len(ctx_text)
        context_ids = tokenizer.encode(rendered[:cut], add_special_tokens=False)
        question_ids = tokenizer.encode(rendered[cut:], add_special_tokens=False)
    else:
        context_ids = _bos(tokenizer) + tokenizer.encode(ctx_text, add_special_tokens=False)
        question_ids = tokenizer.encode(q_text, add_special_tokens=False) if q_text else []
    n = len(context_ids) + len(question_ids)
    if max_prompt_tokens is not None and n > max_prompt_tokens:
        budget = int(max_prompt_tokens) - len(question_ids)
        if budget < 2:
            raise TaskError(f"{row['dataset']} {row.get('_id')}: the question alone has {len(question_ids)} tokens, "
                            f"more than the prompt budget {max_prompt_tokens}; raise model.max_context")
        return Prompt(middle_truncate(context_ids, budget), question_ids, True, n, use_chat)
    return Prompt(context_ids, question_ids, False, n, use_chat)


def build_prompts(rows: Sequence[Mapping], tokenizer, chat: bool, max_context: int | None,
                  templates: Mapping[str, str] | None = None, max_new_tokens: Mapping[str, int] | None = None
                  ) -> list[Prompt]:
    """``build_prompt`` for every row; one warning per task with the number of truncated prompts.

    Each task's prompt budget is the model's ``max_context`` minus its ``max_new_tokens`` (from the
    registry unless given).
    """
    out, truncated, total = [], Counter(), Counter()
    for row in rows:
        name = row["dataset"]
        budget = None
        if max_context is not None:
            new = (max_new_tokens or {}).get(name, get_spec(name).max_new_tokens)
            budget = int(max_context) - int(new)
            if budget < 2:
                raise TaskError(f"{name}: model.max_context={max_context} leaves {budget} tokens for the prompt after "
                                f"max_new_tokens={new}; raise model.max_context above {int(new) + 1}")
        p = build_prompt(row, tokenizer, chat, budget, templates)
        truncated[name] += p.truncated
        total[name] += 1
        out.append(p)
    for name, k in truncated.items():
        if k:
            log.warning("%s: %d of %d prompts exceed the context limit and were middle-truncated", name, k, total[name])
    return out
