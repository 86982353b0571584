# %% [markdown]
# # Attention spectrograms of kept and evicted tokens
#
# A NAMM never reads keys or values. For each cached token it takes the column of attention that the
# newest queries paid to that token, computes its STFT **spectrogram** (n_fft 32, hop 16, Hann window),
# and reduces the frames over time with an **EMA**. The **BAM** scores these features (plus an age
# embedding), and the tokens that score >= 0 form the **kept cache**.
#
# This notebook runs one prompt through the model with a policy-managed cache, recomputes the
# spectrogram features at the policy's update with `namm.torch.features` (the PyTorch mirror of the
# JAX features), and compares the tokens that were kept with those that were evicted: the mean EMA
# magnitude per frequency bin, and the spectrograms of a few example tokens.
#
# The policy updates once, at the end of the prefill, so each token's attention series covers the
# whole prompt. A trained NAMM (`NB_POLICY`) decides what is kept, and the notebook checks that the
# features it recomputes are exactly the EMA the NAMM stored. The untrained NAMM gives every token
# the score 0, so by default H2O (heavy hitters plus a recent window) decides instead.
#
#     NB_POLICY=outputs/main/smollm2/task/namm_policy .venv/bin/python notebooks/attention_spectrograms.py
#
# | variable | default | meaning |
# |---|---|---|
# | `NB_MODEL` | `smollm2` | a `configs/model/` name, a model directory or a hub id |
# | `NB_POLICY` | `untrained` | an exported NAMM directory (`namm.export.save_pretrained`), or `untrained` |
# | `NB_KEEP_BY` | `namm` for a trained NAMM, else `h2o` | the policy that decides what is kept |
# | `NB_BUDGET` | `0.25` | kept cache as a fraction of the prompt (or a token count): H2O's budget and a top-k cap on the NAMM; `none` lets the NAMM's threshold decide |
# | `NB_TASK`, `NB_LENGTH` | `passkey`, `1024` | built-in task that makes the prompt, and its length in tokens |
# | `NB_LAYER` | middle layer | layer of the example spectrograms |
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
import numpy as np
import torch
from omegaconf import OmegaConf

import experiments
from experiments.evaluate import load_policy_cfg
from experiments.lib.models import load_model_from_cfg
from experiments.tasks import build_prompt, generate
from namm.torch import features as F
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
KEEP_BY = os.environ.get("NB_KEEP_BY", "h2o" if POLICY == "untrained" else "namm")
BUDGET = budget_value(os.environ.get("NB_BUDGET", "0.25"))
TASK = os.environ.get("NB_TASK", "passkey")
LENGTH = int(os.environ.get("NB_LENGTH", "1024"))
OUT = ROOT / os.environ.get("NB_OUT", "outputs/notebooks")
OUT.mkdir(parents=True, exist_ok=True)
assert KEEP_BY in ("namm", "h2o"), f"NB_KEEP_BY={KEEP_BY!r}; use namm or h2o"
assert KEEP_BY == "namm" or BUDGET is not None, "H2O needs a budget: set NB_BUDGET (e.g. 0.25)"

# %% [markdown]
# ## Model, prompt and policy

# %%
model_yaml = ROOT / "configs" / "model" / f"{MODEL}.yaml"
model_cfg = OmegaConf.load(model_yaml) if model_yaml.is_file() else OmegaConf.create({"source": MODEL})
model, tok = load_model_from_cfg(model_cfg)
row = generate(TASK, tok, LENGTH, 1, seed=0)[0]
prompt = build_prompt(row, tok, chat=bool(model_cfg.get("chat", False)), max_prompt_tokens=None)
ids = torch.tensor([prompt.ids])
n_tokens = ids.shape[1]

chunk = build_policy({**load_policy_cfg("namm"), "path": POLICY}).chunk_size  # the policy's own prefill chunk
once = chunk * math.ceil((n_tokens + 1) / chunk)  # an update interval past the prompt: one final update
namm = build_policy({**load_policy_cfg("namm"), "path": POLICY, "budget": BUDGET,
                     "update_interval": once, "final_update": True})
policy = namm if KEEP_BY == "namm" else build_policy({**load_policy_cfg("h2o"), "budget": BUDGET,
                                                        "update_interval": once, "final_update": True})
fcfg = namm.cfg.features  # the spectrogram settings the NAMM reads (n_fft, hop, window, EMA coefficient)
num_layers = model.config.num_hidden_layers
LAYER = int(os.environ.get("NB_LAYER", num_layers // 2))
print(f"{MODEL}: {n_tokens} prompt tokens, {num_layers} layers; kept by {KEEP_BY} (budget {BUDGET})")

# %% [markdown]
# ## Record the update
#
# The cache hands the policy the GQA-averaged attention rows of every query since the last update,
# `[1, H, n, N]`. Each token's attention series (its column) is framed, windowed and transformed;
# the frame magnitudes are reduced with the EMA (a token only counts from the frame it appears in).
# We wrap the policy's `update` to compute the same features and record what it kept.


# %%
def spectrogram_features(rows, positions):
    """rows ``[1, H, n, N]`` of a first update -> (EMA ``[H, N, S]``, |STFT| frames ``[H, T, N, S]``)."""
    rows = rows[0, :, rows.shape[-2] % fcfg.hop:]  # as the NAMM: the last frame ends at the newest query
    h, _, n_keys = rows.shape
    left = torch.zeros(h, n_keys, fcfg.context)  # no left context: every token is new at the first update
    is_new = torch.ones(h, n_keys, dtype=torch.bool)
    recency = positions[0].amax(-1, keepdim=True) - positions[0]
    _, ema, _ = F.token_features(rows, left, torch.zeros(h, n_keys, fcfg.spec_dim), is_new, recency, None, fcfg)
    frames = F.stft_magnitudes(torch.cat([left, rows.transpose(-1, -2)], dim=-1), fcfg)
    return ema, frames


def kept_mask(out, shape):
    """``[H, N]`` True where the update kept the slot."""
    if out.keep is None:
        return torch.ones(shape[1:], dtype=torch.bool)
    flags = torch.ones_like(out.keep, dtype=torch.bool) if out.valid is None else out.valid
    return torch.zeros(shape, dtype=torch.bool).scatter(-1, out.keep, flags)[0]


records = {}
update = policy.update


def recording_update(state, rows, keys, positions, valid, n_new, seen, layer_idx, final):
    out = update(state, rows, keys, positions, valid, n_new, seen, layer_idx, final)
    ema, frames = spectrogram_features(rows, positions)
    if KEEP_BY == "namm":  # the features recomputed here are the EMA the NAMM stored
        torch.testing.assert_close(out.state["ema"][0], ema)
    records[layer_idx] = {"ema": ema, "kept": kept_mask(out, positions.shape),
                          "frames": frames if layer_idx == LAYER else None}
    return out


policy.update = recording_update
cache = policy.make_cache(model)
with torch.no_grad():
    prefill(model, cache, ids)
    cache.end_prefill()
assert sorted(records) == list(range(num_layers)), "expected one update per layer at the end of the prefill"
print(f"kept cache after the prefill: {cache.kv_fraction():.3f} of {n_tokens} tokens")

# %% [markdown]
# ## Mean spectrogram of kept and evicted tokens
#
# Pooled over layers and KV heads: the EMA magnitude per frequency bin. Bin k is k cycles per
# `n_fft` queries; bin 0 is the (windowed) mean attention the token received.

# %%
ema = torch.cat([r["ema"].reshape(-1, fcfg.spec_dim) for r in records.values()])
kept = torch.cat([r["kept"].reshape(-1) for r in records.values()])
groups = {"kept": ema[kept], "evicted": ema[~kept]}
bins = np.arange(fcfg.spec_dim)
fig, ax = plt.subplots(figsize=(6, 3.6))
for name, x in groups.items():
    if len(x):
        mean = x.mean(0).numpy()
        std = x.std(0).numpy() if len(x) > 1 else np.zeros_like(mean)
        ax.plot(bins, mean, marker="o", ms=3, label=f"{name} ({len(x)} token-heads)")
        ax.fill_between(bins, np.maximum(mean - std, mean * 0.1), mean + std, alpha=0.15)
ax.set(yscale="log", xlabel=f"frequency bin (cycles per {fcfg.n_fft} queries)", ylabel="EMA |STFT| of attention",
       title=f"{MODEL}, {n_tokens} tokens: kept by {KEEP_BY}, {cache.kv_fraction():.2f} kept")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "spectrogram_kept_vs_evicted.png", dpi=110)

# %% [markdown]
# ## Example tokens
#
# Spectrograms (frequency bin x frame, log magnitude) of tokens of layer `NB_LAYER`, KV head 0:
# the top row kept, the bottom row evicted. Frames before a token entered the context are empty.

# %%
rec = records[LAYER]
slot_ids = np.arange(rec["kept"].shape[1])  # one update over the whole prompt: slot = prompt position
examples = {}
for name, mask in (("kept", rec["kept"][0]), ("evicted", ~rec["kept"][0])):
    slots = slot_ids[mask.numpy()][:-1] if name == "kept" else slot_ids[mask.numpy()]  # skip the newest token
    pick = np.linspace(0, len(slots) - 1, min(4, len(slots))).astype(int)  # up to 4, spread over the prompt
    examples[name] = slots[pick].tolist()
ncol = max(1, max(len(v) for v in examples.values()))
fig, axes = plt.subplots(2, ncol, figsize=(2.6 * ncol, 5), squeeze=False, sharex=True, sharey=True,
                         layout="constrained")
with np.errstate(divide="ignore"):
    logmag = np.log10(rec["frames"][0].numpy())  # KV head 0: [T, N, S]; -inf before a token exists
vmin, vmax = np.percentile(logmag[np.isfinite(logmag)], [2, 100])
for r, (name, slots) in enumerate(examples.items()):
    for c in range(ncol):
        ax = axes[r, c]
        if c >= len(slots):
            ax.axis("off")
            continue
        im = ax.imshow(np.ma.masked_invalid(logmag[:, slots[c]].T), origin="lower", aspect="auto",
                       vmin=vmin, vmax=vmax)
        ax.set_title(f"{name}: token {slots[c]}", fontsize=9)
    axes[r, 0].set_ylabel("frequency bin")
for ax in axes[-1]:
    ax.set_xlabel(f"frame (hop {fcfg.hop})")
fig.colorbar(im, ax=axes, shrink=0.8, label="log10 |STFT|")
fig.suptitle(f"layer {LAYER}, KV head 0", fontsize=10)
fig.savefig(OUT / "spectrogram_examples.png", dpi=110)

# %%
summary = {"model": MODEL, "policy": POLICY, "keep_by": KEEP_BY, "budget": BUDGET, "prompt_tokens": n_tokens,
           "kv_fraction": cache.kv_fraction(), "bins": fcfg.spec_dim, "example_layer": LAYER,
           "examples": examples,
           **{name: {"count": len(x), "mean": x.mean(0).tolist() if len(x) else None} for name, x in groups.items()}}
(OUT / "attention_spectrograms.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: summary[k] for k in ("kv_fraction", "keep_by", "prompt_tokens")}))
