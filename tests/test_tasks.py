"""Task suite: generators, loaders, prompts, registry (tiny byte-level tokenizer, no model)."""

import json
import logging

import pytest

from experiments.lib.models import byte_tokenizer
from experiments.tasks import (GENERATED, LONGBENCH_TASKS, METRICS, REGISTRY, TaskError, build_prompt, build_prompts,
                               generate, get_spec, humaneval_rows, in_split, load_task, load_templates,
                               middle_truncate, read_jsonl, split_rows, write_jsonl)
from experiments.tasks.humaneval import check


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def rows2k(tok):
    return {name: generate(name, tok, 2048, 3, seed=0) for name in GENERATED}


def test_registry_covers_longbench_and_builtins():
    assert len(LONGBENCH_TASKS) == 21
    templates = load_templates()
    for name, spec in REGISTRY.items():
        assert spec.metric in METRICS or spec.metric == "pass_at_1", name
        assert name in templates, name
    # namm-reference 6.1
    assert (get_spec("gov_report").metric, get_spec("gov_report").max_new_tokens) == ("rouge", 512)
    assert (get_spec("lcc").metric, get_spec("lcc").max_new_tokens, get_spec("lcc").category) == ("code_sim", 64, "Code")
    assert (get_spec("hotpotqa").max_new_tokens, get_spec("dureader").metric) == (32, "rouge_zh")
    assert {n for n, s in REGISTRY.items() if s.first_line} == {"trec", "triviaqa", "samsum", "lsht"}
    assert get_spec("passkey").metric == get_spec("kv_retrieval").metric == get_spec("needle_qa").metric == "contains"
    with pytest.raises(TaskError, match="unknown dataset 'nope'"):
        get_spec("nope")


def test_generators_deterministic(tok, rows2k):
    for name in GENERATED:
        again = generate(name, tok, 2048, 2, seed=0)
        assert again == rows2k[name][:2], name  # same seed: same rows; a larger n extends a smaller one
        other = generate(name, tok, 2048, 2, seed=1)
        assert [r["context"] for r in other] != [r["context"] for r in again], name


def test_generators_hit_target_length(tok, rows2k):
    for name, rows in rows2k.items():
        for r in rows:
            n = len(build_prompt(r, tok, chat=False).ids)
            assert 0.9 * 2048 <= n <= 1.1 * 2048, (name, n)
            assert r["length"] == r["context_tokens"] == 2048 and r["dataset"] == name
    for r in generate("passkey", tok, 1024, 3, seed=0):
        assert 0.9 * 1024 <= len(build_prompt(r, tok, chat=False).ids) <= 1.1 * 1024


def test_answer_is_in_context(rows2k):
    for name in ("passkey", "needle_qa", "kv_retrieval"):
        for r in rows2k[name]:
            assert r["answers"][0] in r["context"], name
    for r in rows2k["kv_retrieval"]:
        table = json.loads(r["context"])
        assert table[r["input"]] == r["answers"][0]
    for r in rows2k["passage_retrieval_en"]:
        k = int(r["answers"][0].split()[1])
        paragraphs = r["context"].split("\n\n")
        assert paragraphs[k - 1].startswith(f"Paragraph {k}: ")
        assert r["input"] in paragraphs[k - 1]
        assert sum(r["input"] in p for p in paragraphs) == 1
    for r in rows2k["lcc"]:
        line = r["answers"][0].strip()
        assert line and not line.startswith("#") and r["context"].endswith("\n")


def test_jsonl_round_trip_and_errors(tmp_path, rows2k):
    rows = rows2k["passkey"] + rows2k["lcc"]
    path = write_jsonl(rows, tmp_path / "t.jsonl")
    assert read_jsonl(path) == rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    no_ctx = {k: v for k, v in rows[0].items() if k != "context"}
    bad.write_text(json.dumps(no_ctx) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:1: row is missing 'context'"):
        read_jsonl(bad)
    bad.write_text(json.dumps({**rows[0], "dataset": "mystery"}) + "\n")
    with pytest.raises(TaskError, match="unknown dataset 'mystery'"):
        read_jsonl(bad)
    with pytest.raises(TaskError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="is a directory"):
        read_jsonl(tmp_path)
    # through the task config, with a per-dataset cap
    got = load_task({"name": "jsonl", "path": str(path), "n": 2}, split="all")
    assert [r["_id"] for r in got] == [r["_id"] for r in rows2k["passkey"][:2] + rows2k["lcc"][:2]]


def test_middle_truncation():
    assert middle_truncate(list(range(10)), 4) == [0, 1, 8, 9]
    assert middle_truncate(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert middle_truncate(list(range(3)), 5) == [0, 1, 2]


def test_prompt_split_concatenates(tok, rows2k):
    row = rows2k["passkey"][0]
    raw = build_prompt(row, tok, chat=False)
    assert raw.context_ids[0] == tok.bos_token_id
    assert tok.decode(raw.ids, skip_special_tokens=True) == "".join(
        s.replace("{context}", row["context"]).replace("{input}", row["input"]) for s in [load_templates()["passkey"]])
    assert tok.decode(raw.question_ids).endswith(row["input"])
    chat = build_prompt(row, tok, chat=True)
    rendered = tok.apply_chat_template([{"role": "user", "content": tok.decode(raw.ids[1:])}], tokenize=False,
                                       add_generation_prompt=True)
    assert tok.decode(chat.ids) == rendered
    assert tok.decode(chat.question_ids).endswith("<|assistant|>\n")
    assert row["input"] in tok.decode(chat.question_ids) and row["answers"][0] in tok.decode(chat.context_ids)
    # code tasks stay raw completion even for chat models (as LongBench does)
    code = build_prompt(rows2k["lcc"][0], tok, chat=True)
    assert not code.chat and "<|user|>" not in tok.decode(code.ids)


def test_truncation_keeps_question_and_counts(tok, rows2k, caplog):
    row = rows2k["needle_qa"][0]
    full = build_prompt(row, tok, chat=False)
    cut = build_prompt(row, tok, chat=False, max_prompt_tokens=600)
    assert len(cut) == 600 and cut.truncated and cut.n_tokens_before_truncation == len(full)
    assert cut.question_ids == full.question_ids
    assert cut.context_ids[:100] == full.context_ids[:100] and cut.context_ids[-100:] == full.context_ids[-100:]
    with caplog.at_level(logging.WARNING):
        prompts = build_prompts(rows2k["needle_qa"] + rows2k["passkey"], tok, False, max_context=1000)
    assert all(len(p) <= 1000 - get_spec(r).max_new_tokens for p, r in zip(prompts, ["needle_qa"] * 3 + ["passkey"] * 3))
    msgs = [r.getMessage() for r in caplog.records if "middle-truncated" in r.getMessage()]
    assert sorted(msgs) == ["needle_qa: 3 of 3 prompts exceed the context limit and were middle-truncated",
                            "passkey: 3 of 3 prompts exceed the context limit and were middle-truncated"]
    with pytest.raises(TaskError, match="the question alone"):
        build_prompt(row, tok, chat=False, max_prompt_tokens=5)


def test_split_by_id(tok):
    ids = [{"_id": f"x-{i}"} for i in range(200)]
    train, test = split_rows(ids, "train"), split_rows(ids, "test")
    assert len(train) + len(test) == 200 and 60 < len(train) < 140
    assert not {r["_id"] for r in train} & {r["_id"] for r in test}
    cfg = {"name": "builtin", "tasks": ["passkey", "kv_retrieval"], "n": 2, "context_lengths": [512], "seed": 3}
    rows = load_task(cfg, tok, split="test")
    assert [r["dataset"] for r in rows] == ["passkey"] * 2 + ["kv_retrieval"] * 2
    assert all(in_split(r["_id"], "test") for r in rows)
    assert not {r["_id"] for r in rows} & {r["_id"] for r in load_task(cfg, tok, split="train")}


def test_load_task_errors(tok):
    with pytest.raises(TaskError, match="task.name='nope' is unknown"):
        load_task({"name": "nope"}, tok)
    with pytest.raises(TaskError, match="task.path=FILE"):
        load_task({"name": "jsonl", "path": None}, tok)
    with pytest.raises(TaskError, match="split='dev'"):
        load_task({"name": "passkey"}, tok, split="dev")
    with pytest.raises(TaskError, match="not a built-in task"):
        load_task({"name": "builtin", "tasks": ["qasper"]}, tok)


def test_humaneval_rows():
    rows = humaneval_rows()
    assert len(rows) == 164 and rows[0]["_id"] == "HumanEval/0"
    assert all("def check" in r["answers"][0] and r["entry_point"] for r in rows)
    from experiments.lib.assets import humaneval_problems

    solution = humaneval_problems()[0]["canonical_solution"]
    assert check(rows[0], solution)["passed"]
    assert not check(rows[0], "    return None\n")["passed"]
    assert len(split_rows(rows, "test")) + len(split_rows(rows, "train")) == 164


def test_humaneval_prompt_raw_for_base_and_instruction_for_instruct_models(tok):
    row = humaneval_rows()[0]
    raw = build_prompt(row, tok, chat=False)
    assert tok.decode(raw.ids, skip_special_tokens=True) == row["context"] and not raw.chat
    inst = build_prompt(row, tok, chat=True)
    text = tok.decode(inst.ids)
    assert inst.chat and "Complete the following Python function" in text and row["context"] in text


def test_user_templates_override(tmp_path, tok, rows2k):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"passkey": "Read this.\n{context}\nNow: {input}\nAnswer:"}))
    templates = load_templates(path)
    assert templates["passkey"].startswith("Read this.") and templates["lcc"] == load_templates()["lcc"]
    row = rows2k["passkey"][0]
    p = build_prompt(row, tok, chat=False, templates=templates)
    assert tok.decode(p.context_ids, skip_special_tokens=True) == "Read this.\n" + row["context"]
    assert tok.decode(p.question_ids) == f"\nNow: {row['input']}\nAnswer:"
    path.write_text("{broken")
    with pytest.raises(TaskError, match="not valid JSON"):
        load_templates(path)
