"""The few-row linear path (speculative verification on CPU): the same product, one-row and prefill calls untouched."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.lib.models import tiny_random
from spec_decode.torch import (PromptLookupProposer, SmallBatchLinear, autoregressive_generate, speculative_generate,
                               use_small_batch_linear)
from spec_decode.torch.linear import DEFAULT_MAX_ROWS

from conftest import EPS32


@pytest.mark.parametrize("bias", [True, False])
def test_small_batch_linear_equals_f_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    ref = nn.Linear(24, 40, bias=bias)
    ref.load_state_dict(lin.state_dict())
    assert use_small_batch_linear(lin, 8) == 1 and type(lin) is SmallBatchLinear
    for shape in [(1, 24), (1, 1, 24), (3, 24), (1, 5, 24), (2, 4, 24), (1, 8, 24), (1, 9, 24), (2, 64, 24)]:
        x = torch.randn(*shape)
        out, want = lin(x), F.linear(x, ref.weight, ref.bias)
        assert out.shape == want.shape and out.is_contiguous()
        rows = x.numel() // 24
        if rows == 1 or rows > 8:                        # one-row decode and prefills: F.linear itself
            assert torch.equal(out, want), shape
        else:                                            # the few-row path: same product, other summation order
            # 24 float32 products summed in another order: 24 eps times the sum of |terms|
            w, b = ref.weight.detach(), (ref.bias.detach() if bias else torch.zeros(1))
            scale = ((x.abs() @ w.abs().T).max() + b.abs().max()).item()
            torch.testing.assert_close(out, want, rtol=0, atol=24 * EPS32 * scale)
    x = torch.randn(3, 24, requires_grad=True)           # differentiable like nn.Linear
    lin(x).sum().backward()
    # the gradient sums the 40 output rows of the weight, in autograd's order
    torch.testing.assert_close(x.grad, ref.weight.sum(0).expand(3, 24), rtol=0,
                               atol=40 * EPS32 * ref.weight.detach().abs().sum(0).max().item())


def test_switching_a_model_and_back():
    model, _ = tiny_random("llama", seed=0)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())

    class Adapter(nn.Linear):                            # subclasses (quantised, adapter layers) are left alone
        pass

    model.extra = Adapter(4, 4)
    assert use_small_batch_linear(model) == n_linear
    assert sum(type(m) is SmallBatchLinear for m in model.modules()) == n_linear and type(model.extra) is Adapter
    assert use_small_batch_linear(model, 1) == n_linear
    assert sum(type(m) is nn.Linear for m in model.modules()) == n_linear
    with pytest.raises(TypeError, match="max_rows must be an int"):
        use_small_batch_linear(model, 4.0)


def test_speculative_greedy_with_the_few_row_path_equals_plain_target_greedy():
    model, _ = tiny_random("llama", seed=1)
    ids = torch.tensor([list(b"def f(x):\n    return x + 1\n\ndef f(")])
    ref, _ = autoregressive_generate(model, ids, 24)                      # plain F.linear everywhere
    use_small_batch_linear(model)
    for gamma in (1, 4, 7):
        out, stats = speculative_generate(model, ids, PromptLookupProposer(), 24, gamma=gamma)
        assert out.tolist() == ref.tolist() and stats.new_tokens == 24


def test_bench_verify_writes_json_and_headline(tmp_path, capsys):
    from experiments.bench import verify as bench_verify

    out = tmp_path / "bv.json"
    res = bench_verify.main(["--model", "tiny_random", "--context", "32", "--rows", "1", "2", "5", "--repeats", "1",
                             "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["rows"] for r in saved["rows"]] == [1, 2, 5] and saved["verify5_speedup"] == res["verify5_speedup"] > 0
    assert saved["max_abs_logit_diff"] < 1e-4 and saved["max_rows"] == DEFAULT_MAX_ROWS
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("verify5_speedup: ")
    with pytest.raises(SystemExit):
        bench_verify.main(["--rows", "2", "5"])                              # 1 (the decode step) is required
