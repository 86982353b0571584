# %% [markdown]
# # Acceptance rate by draft position
#
# In speculative decoding a proposer (a distilled draft model, or prompt lookup) proposes gamma
# tokens; the target checks them in one forward pass and keeps the longest accepted prefix. The rate
# at draft position i is the share of rounds whose first i proposals were all accepted
# (`SpecStats.per_position`): it falls with i, and its sum over positions is the number of draft
# tokens gained per target call.
#
# By default the notebook runs `spec_decode.torch.speculative_generate` on a few built-in prompts
# with prompt lookup and every draft in `NB_DRAFT`, and checks in greedy mode that each output is the
# target's own greedy output. With `NB_SPECBENCH` it plots the `specbench.json` of
# `python -m experiments.specbench` instead.
#
#     NB_DRAFT=~/.cache/namm-spec/drafts/smollm2/tvd .venv/bin/python notebooks/acceptance_by_position.py
#     NB_SPECBENCH=outputs/2026-01-01/12-00-00/specbench.json .venv/bin/python notebooks/acceptance_by_position.py
#
# | variable | default | meaning |
# |---|---|---|
# | `NB_MODEL` | `smollm2` | target: a `configs/model/` name, a model directory or a hub id |
# | `NB_DRAFT` | none | comma-separated draft directories (`spec_decode.export`, or any HF Llama with the target's tokenizer); `self` = the target drafting for itself |
# | `NB_GAMMA` | `6` | draft length |
# | `NB_TASK`, `NB_LENGTH`, `NB_PROMPTS` | `lcc`, `512`, `4` | built-in task, prompt length in tokens, number of prompts |
# | `NB_NEW_TOKENS` | `48` | tokens generated per prompt |
# | `NB_TEMPERATURE` | `0` | 0: greedy; otherwise rejection sampling at this temperature |
# | `NB_SPECBENCH` | none | a `specbench.json` to plot instead of running |
# | `NB_OUT` | `outputs/notebooks` | where figures and JSON go (relative paths start at the repository root) |

# %%
import json
import math
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # run as a script: files only
import matplotlib.pyplot as plt
import torch
from omegaconf import OmegaConf

import experiments
from experiments.lib.models import load_model_from_cfg
from experiments.tasks import build_prompt, generate
from spec_decode.torch import (DraftHandle, DraftProposer, PromptLookupProposer, Sampling, SpecStats,
                               autoregressive_generate, speculative_generate)

ROOT = Path(experiments.__file__).resolve().parents[1]
MODEL = os.environ.get("NB_MODEL", "smollm2")
DRAFTS = [d for d in os.environ.get("NB_DRAFT", "").split(",") if d]
GAMMA = int(os.environ.get("NB_GAMMA", "6"))
TASK = os.environ.get("NB_TASK", "lcc")
LENGTH = int(os.environ.get("NB_LENGTH", "512"))
N_PROMPTS = int(os.environ.get("NB_PROMPTS", "4"))
NEW_TOKENS = int(os.environ.get("NB_NEW_TOKENS", "48"))
TEMPERATURE = float(os.environ.get("NB_TEMPERATURE", "0"))
SPECBENCH = os.environ.get("NB_SPECBENCH")
OUT = ROOT / os.environ.get("NB_OUT", "outputs/notebooks")
OUT.mkdir(parents=True, exist_ok=True)


# %% [markdown]
# ## Acceptance counts
#
# Either from a benchmark report, or from our own loop: each method's `SpecStats` accumulates the
# proposed and accepted counts per draft position over all prompts.


# %%
def from_specbench(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {f"{suite}/{name}": {"per_position": r["per_position"], "acceptance_rate": r["alpha"],
                                "tokens_per_call": r["tokens_per_call"]}
            for suite, rows in report["results"].items() for name, r in rows.items() if r.get("per_position")}


def from_run() -> tuple[dict, dict]:
    model_yaml = ROOT / "configs" / "model" / f"{MODEL}.yaml"
    model_cfg = OmegaConf.load(model_yaml) if model_yaml.is_file() else OmegaConf.create({"source": MODEL})
    target, tok = load_model_from_cfg(model_cfg)
    eos = target.generation_config.eos_token_id
    drafts = {}
    for d in DRAFTS:
        path = ROOT / Path(d).expanduser()
        drafts[d if d == "self" else path.name] = (DraftHandle(target) if d == "self"
                                                   else DraftHandle.from_pretrained(path, target, tok))
    proposers = {"prompt_lookup": lambda: PromptLookupProposer(3)}
    proposers.update({name: (lambda h=h: DraftProposer(h)) for name, h in drafts.items()})
    sampling = Sampling(do_sample=TEMPERATURE > 0, temperature=TEMPERATURE or 1.0)
    stats = {name: SpecStats() for name in proposers}
    lossless = {name: True for name in proposers}
    for i, row in enumerate(generate(TASK, tok, LENGTH, N_PROMPTS, seed=0)):
        x = torch.tensor([build_prompt(row, tok, chat=False, max_prompt_tokens=None).ids])
        ref = autoregressive_generate(target, x, NEW_TOKENS, eos_token_id=eos)[0] if not sampling.do_sample else None
        for name, make in proposers.items():
            gen = torch.Generator().manual_seed(i)
            out, _ = speculative_generate(target, x, make(), NEW_TOKENS, gamma=GAMMA, sampling=sampling,
                                          eos_token_id=eos, generator=gen, stats=stats[name])
            if ref is not None:
                lossless[name] &= out.tolist() == ref.tolist()
        print(f"prompt {i}: {x.shape[1]} tokens", {k: round(s.acceptance_rate, 3) for k, s in stats.items()})
    methods = {name: {"per_position": s.per_position, "acceptance_rate": s.acceptance_rate,
                      "tokens_per_call": s.tokens_per_call, "proposed": s.proposed} for name, s in stats.items()}
    return methods, (lossless if not sampling.do_sample else {})


if SPECBENCH:
    methods, lossless = from_specbench(ROOT / Path(SPECBENCH).expanduser()), {}
else:
    methods, lossless = from_run()
    assert all(lossless.values()), f"speculative output differs from the target's greedy output: {lossless}"

# %% [markdown]
# ## Plot

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for name, m in sorted(methods.items()):
    pos = range(1, len(m["per_position"]) + 1)
    ax.plot(pos, m["per_position"], marker="o",
            label=f"{name}: alpha {m['acceptance_rate']:.2f}, {m['tokens_per_call']:.2f} tokens/call")
ax.set(xlabel="draft position", ylabel="P(accepted up to this position)", ylim=(-0.03, 1.03),
       title=f"{MODEL}: acceptance by draft position" if not SPECBENCH else Path(SPECBENCH).name)
ax.xaxis.get_major_locator().set_params(integer=True)
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "acceptance_by_position.png", dpi=110)


# %%
def finite(x):
    return None if isinstance(x, float) and math.isnan(x) else x


summary = {"source": str(SPECBENCH) if SPECBENCH else "run", "model": MODEL, "gamma": None if SPECBENCH else GAMMA,
           "lossless": lossless,
           "methods": {k: {f: [finite(v) for v in x] if isinstance(x, list) else finite(x) for f, x in m.items()}
                       for k, m in methods.items()}}
(OUT / "acceptance_by_position.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: [round(v, 3) if v is not None else None for v in m["per_position"]]
                  for k, m in summary["methods"].items()}))
