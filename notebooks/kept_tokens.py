# %% [markdown]
# # Which tokens each policy keeps
#
# After the prefill, every layer of the cache holds its own **kept cache**: NAMM and H2O evict per
# layer and per KV head. This notebook runs one prompt under each policy, on the NAMM's schedule
# (the exported policy's update interval, 512 tokens in the paper; H2O also evicts at the end of the
# prefill), and draws a heat map of layers x prompt positions: 1 = every KV head of the layer kept
# the token, 0 = evicted.
#
# With `NB_BUDGET=none` the NAMM keeps what its threshold selects and H2O gets the NAMM's measured
# kept fraction (as in `python -m experiments.main`); with a budget, H2O uses it and it caps the NAMM
# (top-k). The untrained NAMM scores every token 0: it keeps everything, or the oldest tokens under a cap.
#
#     NB_POLICY=outputs/main/smollm2/task/namm_policy NB_BUDGET=none .venv/bin/python notebooks/kept_tokens.py
#
# | variable | default | meaning |
# |---|---|---|
# | `NB_MODEL` | `smollm2` | a `configs/model/` name, a model directory or a hub id |
# | `NB_POLICY` | `untrained` | an exported NAMM directory (`namm.export.save_pretrained`), or `untrained` |
# | `NB_BUDGET` | `0.25` | kept cache as a fraction of the tokens seen (or a token count); `none`: see above |
# | `NB_TASK`, `NB_LENGTH` | `passkey`, `1024` | built-in task that makes the prompt, and its length in tokens |
# | `NB_UPDATE_INTERVAL` | the NAMM's | tokens between policy updates, for both policies |
# | `NB_OUT` | `outputs/notebooks` | where figures and JSON go (relative paths start at the repository root) |

# %%
import json
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # run as a script: files only
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import torch
from omegaconf import OmegaConf

import experiments
from experiments.evaluate import load_policy_cfg
from experiments.lib.models import load_model_from_cfg
from experiments.tasks import build_prompt, generate
from namm.torch.generate import prefill
from namm.torch.policies import build_policy


def budget_value(text: str):
    """``0.25`` -> fraction of the tokens seen, ``256`` -> token count, ``none`` -> None."""
    if text.strip().lower() in ("", "none", "null"):
        return None
    return float(text) if "." in text else int(text)


ROOT = Path(experiments.__file__).resolve().parents[1]
MODEL = os.environ.get("NB_MODEL", "smollm2")
POLICY = os.environ.get("NB_POLICY", "untrained")
BUDGET = budget_value(os.environ.get("NB_BUDGET", "0.25"))
TASK = os.environ.get("NB_TASK", "passkey")
LENGTH = int(os.environ.get("NB_LENGTH", "1024"))
INTERVAL = os.environ.get("NB_UPDATE_INTERVAL")
OUT = ROOT / os.environ.get("NB_OUT", "outputs/notebooks")
OUT.mkdir(parents=True, exist_ok=True)

# %%
model_yaml = ROOT / "configs" / "model" / f"{MODEL}.yaml"
model_cfg = OmegaConf.load(model_yaml) if model_yaml.is_file() else OmegaConf.create({"source": MODEL})
model, tok = load_model_from_cfg(model_cfg)
row = generate(TASK, tok, LENGTH, 1, seed=0)[0]
prompt = build_prompt(row, tok, chat=bool(model_cfg.get("chat", False)), max_prompt_tokens=None)
ids = torch.tensor([prompt.ids])
n_tokens, num_layers = ids.shape[1], model.config.num_hidden_layers
print(f"{MODEL}: {n_tokens} prompt tokens ({len(prompt.context_ids)} context), {num_layers} layers")


# %% [markdown]
# ## Prefill under each policy
#
# Each layer's cache stores the original position of every kept token per KV head
# (`layer.positions`, `[1, H, K]`); in `masked` selection some slots are padding (`layer.valid`).


# %%
def kept_after_prefill(policy) -> tuple[torch.Tensor, float]:
    """``[layers, prompt positions]`` share of KV heads that keep each token, and the kept cache."""
    cache = policy.make_cache(model)
    with torch.no_grad():
        prefill(model, cache, ids)
        cache.end_prefill()
    kept = torch.zeros(num_layers, n_tokens)
    for i, layer in enumerate(cache.layers):
        pos = layer.positions[0]  # [H, K]
        flags = torch.ones_like(pos, dtype=torch.float32) if layer.valid is None else layer.valid[0].float()
        kept[i].scatter_add_(0, pos.reshape(-1), flags.reshape(-1) / pos.shape[0])
    return kept, cache.kv_fraction()


schedule = {"chunk_size": None, "update_interval": None}  # None: the exported NAMM's own schedule
if INTERVAL:
    schedule = {"chunk_size": min(128, int(INTERVAL)), "update_interval": int(INTERVAL)}
namm = build_policy({**load_policy_cfg("namm"), "path": POLICY, "budget": BUDGET, **schedule})
maps = {"namm": kept_after_prefill(namm)}
h2o_budget = BUDGET if BUDGET is not None else min(1.0, max(0.01, round(maps["namm"][1], 3)))
h2o = build_policy({**load_policy_cfg("h2o"), "budget": h2o_budget, "chunk_size": namm.chunk_size,
                    "update_interval": namm.update_interval})
maps[f"h2o@{h2o_budget}"] = kept_after_prefill(h2o)
print(f"updates every {namm.update_interval} tokens (prefill chunks of {namm.chunk_size})")
for label, (_, kv) in maps.items():
    print(f"{label}: kept cache {kv:.3f}")

# %% [markdown]
# ## Heat maps
#
# The dashed line separates the context from the question.

# %%
fig, axes = plt.subplots(len(maps), 1, figsize=(10, 1.0 + len(maps) * (1.0 + 0.05 * num_layers)), squeeze=False,
                         sharex=True, layout="constrained")
for ax, (label, (kept, kv)) in zip(axes[:, 0], maps.items()):
    im = ax.imshow(kept.numpy(), aspect="auto", interpolation="nearest", vmin=0, vmax=1, cmap="viridis",
                   origin="lower")
    ax.axvline(len(prompt.context_ids) - 0.5, color="white", ls="--", lw=0.8)
    ax.set(title=f"{label}: kept cache {kv:.2f}", ylabel="layer")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
axes[-1, 0].set_xlabel("prompt position")
fig.colorbar(im, ax=axes[:, 0], label="share of KV heads keeping the token")
fig.suptitle(f"{MODEL}, {TASK}, {n_tokens} tokens, NAMM: {POLICY}", fontsize=10)
fig.savefig(OUT / "kept_tokens.png", dpi=110)

# %%
summary = {"model": MODEL, "policy": POLICY, "prompt_tokens": n_tokens, "context_tokens": len(prompt.context_ids),
           "layers": num_layers,
           "policies": {label: {"kv_fraction": kv, "kept_per_layer": kept.mean(1).tolist()}
                        for label, (kept, kv) in maps.items()}}
(OUT / "kept_tokens.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({label: round(v["kv_fraction"], 3) for label, v in summary["policies"].items()}))
