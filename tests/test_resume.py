"""A killed run loses nothing: corrupt shard and checkpoint files are reported in one line that names the file
and the fix, and a SIGKILLed ``train_namm`` / ``evaluate`` rerun with the same command ends where an
uninterrupted run ends, bit for bit (tiny random model, CPU).

The kills come from the parent, which watches the files the run writes (shard files, metrics lines,
predictions lines); the export, which a parent cannot hit, uses the ``NAMM_KILL_AT=export`` hook.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from namm.evolve import EvolutionConfig, EvolutionError, evolve, solution
from namm.shards import ShardError

REPO = Path(__file__).resolve().parents[1]
TINY = ["run=builtin_i1", "model=tiny_random", "task.tasks=[passkey]", "task.context_lengths=[256]", "task.n=4",
        "namm.features.update_interval=64", "namm.features.chunk_size=64", "namm.scorer.hidden=4",   # 588 params
        "evolution.population_size=4",
        "evolution.items_per_generation=2", "evolution.eval_every=1", "evolution.generations=3",
        "extract_layers=null", "fitness.context_queries=8", "fitness.max_qa_queries=16", "reference_baselines=[]",
        "logging.wandb_mode=disabled", "progress=false"]
TIMING = {"time", "time/generation_s", "wall_s"}     # the only fields allowed to differ between two runs


# --------------------------------------------------------------------------------------------
# Subprocess runs of the real entry points.


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu",
             # compiled XLA programs are shared by the runs of this module (same program, same bits, less time)
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    e.pop("NAMM_KILL_AT", None)
    return e


def _run(env, module, args, log, kill_when=None, kill_at=None, timeout=900):
    """Run ``python -m module args``; SIGKILL it from here as soon as ``kill_when()`` holds. -> return code."""
    run_env = dict(env, **({"NAMM_KILL_AT": kill_at} if kill_at else {}))
    with open(log, "a") as out:
        p = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=run_env, stdout=out,
                             stderr=subprocess.STDOUT)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < timeout:
            if kill_when is not None and kill_when():
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        return p.wait(timeout=60)


def _train(env, root, **kw):
    return _run(env, "experiments.train_namm", [*TINY, f"runs_root={root}"], root.parent / f"{root.name}.log", **kw)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _jsonl(path: Path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _assert_same_stage(a: Path, b: Path) -> None:
    """Every output of two train_namm runs is equal, bit for bit, but for the timing fields."""
    for f in ("namm_policy/model.safetensors", "namm_policy/config.json", "evolution/norm_stats.json"):
        assert (a / "builtin_i1" / f).read_bytes() == (b / "builtin_i1" / f).read_bytes(), f
    for f in ("latest.npz", "best.npz"):              # the whole ES state, PRNG key, cursor and info
        x, y = _npz(a / "builtin_i1" / "evolution" / f), _npz(b / "builtin_i1" / "evolution" / f)
        assert sorted(x) == sorted(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), (f, k)
    assert _without_timing(_jsonl(a / "builtin_i1" / "metrics.jsonl")) == \
        _without_timing(_jsonl(b / "builtin_i1" / "metrics.jsonl"))
    sa, sb = (json.loads((r / "builtin_i1" / "train_summary.json").read_text()) for r in (a, b))
    assert _without_timing([{**sa, "ckpt_dir": 0, "export_dir": 0}]) == _without_timing([{**sb, "ckpt_dir": 0,
                                                                                           "export_dir": 0}])
    ma, mb = (json.loads((r / "kv_stats" / "manifest.json").read_text()) for r in (a, b))
    assert ma == mb                                   # same shards, same sizes and checksums


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The uninterrupted run."""
    root = tmp_path_factory.mktemp("resume") / "reference"
    assert _train(env, root) == 0, (root.parent / "reference.log").read_text()[-3000:]
    return root


def test_train_namm_killed_at_three_points_resumes_bit_for_bit(reference, env):
    root = reference.parent / "killed"
    stage = root / "builtin_i1"
    stats_dir = root / "kv_stats"
    log = root.parent / "killed.log"

    # (i) during the KV extraction: killed once the second shard file is in place
    rc = _train(env, root, kill_when=lambda: len(list(stats_dir.glob("*.safetensors"))) >= 2)
    assert rc == -signal.SIGKILL, log.read_text()[-3000:]
    kept = json.loads((stats_dir / "manifest.json").read_text())["shards"]
    assert 1 <= len(kept) < 4 and not (stage / "evolution" / "latest.npz").exists()
    inodes = {n: (stats_dir / e["file"]).stat().st_ino for n, e in kept.items()}

    # (ii) mid-evolution: the rerun extracts only the missing shards, then is killed once generation 2 is logged
    # (a generation is logged before its checkpoint is written: the rerun redoes it and does not log it twice)
    rc = _train(env, root, kill_when=lambda: _lines(stage / "metrics.jsonl") >= 2)
    assert rc == -signal.SIGKILL, log.read_text()[-3000:]
    assert {n: (stats_dir / kept[n]["file"]).stat().st_ino for n in kept} == inodes      # kept shards untouched
    assert len(json.loads((stats_dir / "manifest.json").read_text())["shards"]) == 4
    gen = json.loads(str(_npz(stage / "evolution" / "latest.npz")["info_json"]))["generation"]
    assert gen in (1, 2) and not (stage / "namm_policy").exists()

    # (iii) during the export: weights written, config not yet
    rc = _train(env, root, kill_at="export")
    assert rc == -signal.SIGKILL, log.read_text()[-3000:]
    policy = stage / "namm_policy"
    assert (policy / "model.safetensors").exists() and not (policy / "config.json").exists()
    assert not (stage / "train_summary.json").exists()

    # the same command once more finishes; every output equals the uninterrupted run's
    assert _train(env, root) == 0, log.read_text()[-3000:]
    _assert_same_stage(reference, root)
    assert [r["generation"] for r in _jsonl(stage / "metrics.jsonl")] == [1, 2, 3]    # each generation logged once
    assert not list((stage / "evolution").glob(".*.tmp"))


def test_unreadable_latest_checkpoint_is_one_line(reference, env):
    """What the command line shows for a torn latest.npz: one line naming it and the fix (exit status 2)."""
    root = reference.parent / "torn"
    shutil.copytree(reference, root)
    ckpt = root / "builtin_i1" / "evolution"
    data = (ckpt / "latest.npz").read_bytes()
    (ckpt / "latest.npz").write_bytes(data[: len(data) // 2])
    log = root.parent / "torn.log"
    assert _train(env, root) == 2
    err = [l for l in log.read_text().splitlines() if l.startswith("error:")]
    assert len(err) == 1 and f"checkpoint {ckpt / 'latest.npz'} cannot be read" in err[0], log.read_text()[-2000:]
    best = json.loads(str(_npz(ckpt / "best.npz")["info_json"]))["generation"]
    assert f"copy best.npz over it to resume from generation {best}" in err[0] and "delete it to restart" in err[0]


def test_evaluate_killed_mid_run_resumes_to_the_same_results(reference, env):
    """``experiments.evaluate`` SIGKILLed after its first prediction; the rerun's results rows equal an
    uninterrupted run's (but for the timing fields)."""
    policy = reference / "builtin_i1" / "namm_policy"
    args = ["model=tiny_random", "task=passkey", "task.n=2", "task.context_lengths=[256]", "split=all",
            "policy=namm", f"policy.path={policy}", "policy.chunk_size=64", "policy.update_interval=64",
            "compare=[recency]", "budgets=[128]", "logging.wandb_mode=disabled", "progress=false"]
    ref, killed = reference.parent / "eval_reference", reference.parent / "eval_killed"
    assert _run(env, "experiments.evaluate", [*args, f"output_dir={ref}"], ref.parent / "eval_ref.log") == 0
    rc = _run(env, "experiments.evaluate", [*args, f"output_dir={killed}"], killed.parent / "eval_killed.log",
              kill_when=lambda: _lines(killed / "predictions.jsonl") >= 1)
    assert rc == -signal.SIGKILL
    assert _lines(killed / "predictions.jsonl") < 4 and not (killed / "results.jsonl").exists()
    assert _run(env, "experiments.evaluate", [*args, f"output_dir={killed}"], killed.parent / "eval_killed.log") == 0
    for f in ("results.jsonl", "predictions.jsonl"):
        assert _without_timing(_jsonl(ref / f)) == _without_timing(_jsonl(killed / f)), f
    assert len(_jsonl(killed / "results.jsonl")) == 2 and len(_jsonl(killed / "predictions.jsonl")) == 4


# --------------------------------------------------------------------------------------------
# Corrupt files, in process.


def test_corrupt_shard_is_named_and_only_it_is_extracted_again(tmp_path, tiny_llama, one_torch_thread):
    from experiments.extract import extract
    from experiments.tasks import load_task
    from namm import stats as kvstats

    model, tok = tiny_llama
    rows = load_task({"name": "passkey", "n": 3, "context_lengths": [256], "seed": 0}, tok, split="all")

    def run():
        return extract(model, tok, rows, tmp_path, layers=[0], chat=False, max_context=4096, progress=False)

    assert run()["extracted_now"] == 3
    names = kvstats.open_store(tmp_path).names()
    files = {n: tmp_path / f"{n}.safetensors" for n in names}
    original = {n: f.read_bytes() for n, f in files.items()}
    victim, path = names[1], files[names[1]]
    for damage, what in ((lambda b: b[: len(b) // 2], "bytes, the manifest records"),           # a torn write
                         (lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:200]) + b[200:], "checksum mismatch")):
        path.write_bytes(damage(original[victim]))
        with pytest.raises(ShardError) as e:
            kvstats.load_prompts(tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"shard file {path} is corrupt or truncated (") and what in msg
        assert "rerun the extraction" in msg
        stamps = {n: os.stat(f).st_ino for n, f in files.items() if n != victim}
        tmp = tmp_path / f".{path.name}.k1ll3d.tmp"
        tmp.write_bytes(b"half a shard")                             # a write killed mid-way, over 10 minutes ago
        os.utime(tmp, (time.time() - 3600, time.time() - 3600))
        (tmp_path / ".manifest.json.wr1t1ng.tmp").write_bytes(b"{")  # another writer's, in progress: left alone
        assert run()["extracted_now"] == 1                     # the rerun rewrites that shard and only it
        assert {n: os.stat(f).st_ino for n, f in files.items() if n != victim} == stamps
        assert path.read_bytes() == original[victim] and not tmp.exists()
        assert [p.name for p in tmp_path.glob(".*.tmp")] == [".manifest.json.wr1t1ng.tmp"]
        assert len(kvstats.load_prompts(tmp_path)) == 3


class _Quadratic:
    """A cheap deterministic fitness for the checkpoint tests."""

    num_items = 4

    def evaluate(self, population, items):
        x = np.asarray(population, np.float64)
        return (-np.sum((x - 0.3) ** 2, axis=1) - 0.01 * float(np.mean(items))).astype(np.float32)


ES = EvolutionConfig(population_size=4, generations=5, items_per_generation=2, eval_every=1, sigma_init=0.2)


def _evolve(ckpt_dir, es=ES):
    return evolve(_Quadratic(), 6, es, ckpt_dir, eval_fitness=_Quadratic(), progress=False)


def _same_checkpoints(a: Path, b: Path) -> None:
    for f in ("latest.npz", "best.npz"):
        x, y = _npz(a / f), _npz(b / f)
        assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x), f


def test_corrupt_checkpoints_are_named_with_their_fix(tmp_path):
    ref = _evolve(tmp_path / "ref")
    run = tmp_path / "run"
    _evolve(run, EvolutionConfig(**{**ES.__dict__, "generations": 3}))       # a stage stopped at generation 3
    shutil.copy(run / "latest.npz", tmp_path / "gen3.npz")
    best_gen = json.loads(str(_npz(run / "best.npz")["info_json"]))["generation"]

    # a torn latest.npz: one line naming it; resuming from best.npz as it says gives the uninterrupted result
    data = (run / "latest.npz").read_bytes()
    (run / "latest.npz").write_bytes(data[: len(data) // 3])
    with pytest.raises(EvolutionError) as e:
        _evolve(run)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {run / 'latest.npz'} cannot be read")
    assert f"copy best.npz over it to resume from generation {best_gen}" in msg
    shutil.copy(run / "best.npz", run / "latest.npz")
    out = _evolve(run)
    assert out.generation == 5 and np.array_equal(out.mean, ref.mean)
    _same_checkpoints(tmp_path / "ref", run)
    assert out.last_metrics == {k: v for k, v in ref.last_metrics.items() if not k.startswith("time/")}

    # a garbled best.npz: named, with the fix (restart the stage); solution() says the same
    good_best = (run / "best.npz").read_bytes()
    (run / "best.npz").write_bytes(b"garbage" * 50)
    for call in (lambda: _evolve(run), lambda: solution(run / "best.npz")):
        with pytest.raises(EvolutionError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"checkpoint {run / 'best.npz'} cannot be read")
        assert "restart the stage" in msg

    # no readable best.npz: the fix for a garbled latest.npz is to restart
    (run / "latest.npz").write_bytes(b"\x00" * 300)
    with pytest.raises(EvolutionError, match=r"latest.npz cannot be read .*; delete it to restart the stage$"):
        _evolve(run)

    # a leftover temporary file of a killed checkpoint write is never read, and is removed
    (run / "best.npz").write_bytes(good_best)
    shutil.copy(tmp_path / "gen3.npz", run / "latest.npz")
    (run / ".latest.npz.k1ll3d.tmp").write_bytes(data[: len(data) // 2])
    out = _evolve(run)
    assert not list(run.glob(".*.tmp")) and np.array_equal(out.mean, ref.mean)
    _same_checkpoints(tmp_path / "ref", run)


def test_export_writes_the_same_bytes_for_the_same_parameters(tmp_path):
    """safetensors writes its header metadata in hash order; the export sorts it, so a rerun's policy file (and
    the checksum in its config) equals the first run's."""
    from namm.config import NAMMConfig
    from namm.export import load_pretrained, save_pretrained
    from namm.scoring import num_params

    cfg = NAMMConfig()
    params = np.linspace(-1, 1, num_params(cfg), dtype=np.float32)
    base = {"name": "tiny_random", "num_layers": 2, "num_kv_heads": 2, "num_q_heads": 4, "head_dim": 16}
    files = set()
    for i in range(12):
        out = save_pretrained(tmp_path / str(i), params, cfg, None, base)
        files.add(((out / "model.safetensors").read_bytes(), (out / "config.json").read_bytes()))
    assert len(files) == 1
    assert np.array_equal(load_pretrained(tmp_path / "0")[0], params)
