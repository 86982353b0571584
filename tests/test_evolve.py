"""CMA-ES loop: paper defaults, maximisation, exact resume after a kill, stages, device sharding."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from namm.evolve import (CMA_ES, EvolutionConfig, EvolutionError, Cursor, evolve, lazy_eigen_interval,
                         load_checkpoint, make_strategy, next_items, population_sharding)

from conftest import EPS32

ROOT = Path(__file__).resolve().parents[1]

# A deterministic toy problem: maximise -mean_i ||x - t_i||^2 over sampled targets t_i.
TOY = textwrap.dedent("""
    import sys, time, json
    import numpy as np, jax, jax.numpy as jnp
    from namm.evolve import evolve, EvolutionConfig

    class Sphere:
        num_items = 12
        def __init__(self, sleep=0.0):
            self.t = jax.random.normal(jax.random.key(1), (12, 24)) * 0.3
            self.sleep = sleep
            self.f = jax.jit(jax.vmap(lambda x, t: -jnp.mean(jnp.sum((x[None] - t) ** 2, -1)), (0, None)))
        def evaluate(self, pop, items):
            time.sleep(self.sleep)
            return self.f(pop, self.t[items])

    out, gens, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    cfg = EvolutionConfig(population_size=8, generations=gens, items_per_generation=5, eval_every=2, seed=3)
    r = evolve(Sphere(sleep), 24, cfg, out, eval_fitness=Sphere(), progress=False)
    np.save(out + "/final_mean.npy", r.mean)
    print(json.dumps({"devices": len(jax.devices()), "generation": r.generation}))
""")


def _toy(out: Path, gens: int, sleep: float = 0.0, devices: int = 1) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen([sys.executable, "-c", TOY, str(out), str(gens), str(sleep)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_paper_defaults():
    cfg = EvolutionConfig()
    assert (cfg.population_size, cfg.elite_ratio, cfg.sigma_init) == (32, 0.5, 0.065)
    es, params = make_strategy(4172, cfg)
    assert es.num_elites == 16
    w = np.asarray(params.weights)
    # namm-reference.md 5.1: positive weights, rank 1 -> 16, and the derived constants
    # the reference's table to 3 decimals; its figures sit up to 5.5e-4 from the exact log weights (more than
    # their rounding), so 1.5e-3 (float64 arithmetic on both sides: nothing here varies between runs)
    np.testing.assert_allclose(w[:16], [.198, .149, .120, .100, .084, .071, .061, .051,
                                        .043, .035, .029, .023, .017, .012, .007, .002], rtol=0, atol=1.5e-3)
    assert np.all(w[16:] < 0) and abs(w[:16].sum() - 1) < 1e-5
    np.testing.assert_allclose([params.mu_eff, params.c_1, params.c_mu, params.c_std, params.c_c, params.chi_n],
                               [9.179, 1.15e-7, 8.37e-7, 0.00267, 0.00096, 64.59], rtol=3e-3)  # printed to 3-4 digits
    assert float(params.std_init) == pytest.approx(0.065, rel=EPS32) and params.c_mean == 1.0     # 0.065 as float32
    assert lazy_eigen_interval(es, params) == es.eigen_interval == 25


def test_lazy_eigen_ask_matches_evosax_on_decomposition_generations():
    from evosax.algorithms import CMA_ES as Ref
    ref = Ref(6, jnp.zeros(5))
    lazy = CMA_ES(6, jnp.zeros(5), eigen_interval=1)
    p = ref.default_params
    s_ref = ref.init(jax.random.key(0), jnp.ones(5), p)
    s_lazy = lazy.init(jax.random.key(0), jnp.ones(5), p)
    x_ref, _ = ref.ask(jax.random.key(1), s_ref, p)
    x_lazy, _ = lazy.ask(jax.random.key(1), s_lazy, p)
    # mean + sigma B D z in 5 dimensions: 5-term float32 sums, possibly in another order
    np.testing.assert_allclose(x_ref, x_lazy, rtol=0, atol=5 * EPS32 * float(np.abs(np.asarray(x_ref)).max()))


def test_data_cursor_without_replacement_and_deterministic():
    seen, c = [], Cursor()
    for _ in range(3):
        idx, c = next_items(7, 10, 3, c)
        seen += idx.tolist()
    assert len(set(seen)) == 9 and c == Cursor(0, 9)
    idx, c2 = next_items(7, 10, 3, c)                    # 1 left < 3: next epoch
    assert c2 == Cursor(1, 3) and len(idx) == 3
    assert np.array_equal(next_items(7, 10, 3, Cursor())[0], next_items(7, 10, 3, Cursor())[0])
    assert np.array_equal(next_items(7, 4, 8, Cursor())[0], np.arange(4))


def test_kill_resume_and_four_devices_equal_uninterrupted(tmp_path):
    """Uninterrupted (1 device), uninterrupted (4 devices) and killed+resumed runs end identically."""
    gens = 8
    a = _toy(tmp_path / "a", gens)
    b = _toy(tmp_path / "b", gens, devices=4)
    c = _toy(tmp_path / "c", gens, sleep=0.25)
    # kill c with SIGKILL once it has checkpointed a few generations (mid-run, no clean-up)
    latest, deadline = tmp_path / "c" / "latest.npz", time.time() + 180
    while time.time() < deadline and c.poll() is None:
        if latest.exists():
            with np.load(latest) as z:
                if json.loads(str(z["info_json"]))["generation"] >= 3:
                    break
        time.sleep(0.05)
    assert c.poll() is None, "run finished before it could be killed"
    os.kill(c.pid, signal.SIGKILL)
    c.wait()
    with np.load(latest) as z:
        killed_at = json.loads(str(z["info_json"]))["generation"]
    assert 3 <= killed_at < gens
    ra, rb = _finish(a), _finish(b)
    rc = _finish(_toy(tmp_path / "c", gens))             # same command again
    assert (ra["devices"], rb["devices"]) == (1, 4)
    assert ra["generation"] == rb["generation"] == rc["generation"] == gens
    mean_a = np.load(tmp_path / "a" / "final_mean.npy")
    np.testing.assert_array_equal(mean_a, np.load(tmp_path / "b" / "final_mean.npy"))
    np.testing.assert_array_equal(mean_a, np.load(tmp_path / "c" / "final_mean.npy"))
    assert (tmp_path / "a" / "best.npz").exists()


class _Quadratic:
    """Maximum at x = 0.2 (a deterministic fitness with an obvious optimum)."""
    num_items = 4

    def __init__(self):
        self.f = jax.jit(lambda pop: -jnp.sum((pop - 0.2) ** 2, -1))

    def evaluate(self, pop, items):
        return self.f(pop)


def test_maximises_stages_and_refuses_mismatch(tmp_path):
    fit = _Quadratic()
    cfg = EvolutionConfig(population_size=8, generations=25, items_per_generation=2, eval_every=5, seed=0)
    seen = []
    r1 = evolve(fit, 6, cfg, tmp_path / "i1", eval_fitness=fit, progress=False,
                callback=lambda m, g: seen.append(g))
    assert seen == list(range(1, 26))
    assert r1.history[-1]["fitness/mean"] > r1.history[0]["fitness/mean"]     # maximised, not minimised
    assert float(fit.evaluate(r1.mean[None], None)[0]) > float(fit.evaluate(np.zeros((1, 6)), None)[0])
    assert r1.best_eval == max(h["eval/mean_fitness"] for h in r1.history if "eval/mean_fitness" in h)
    # stage 2 resumes the full ES state and the generation counter of stage 1's best checkpoint
    best = load_checkpoint(tmp_path / "i1" / "best.npz", make_strategy(6, cfg)[0].init(
        jax.random.key(0), jnp.zeros(6), make_strategy(6, cfg)[1]))
    cfg2 = EvolutionConfig(population_size=8, generations=3, items_per_generation=2, eval_every=0, seed=0)
    r2 = evolve(fit, 6, cfg2, tmp_path / "i2", init_from=tmp_path / "i1" / "best.npz", progress=False)
    assert r2.generation == best.generation + 3
    # a checkpoint directory of another run is refused; so is a wrong population
    with pytest.raises(EvolutionError, match="another run"):
        evolve(fit, 6, EvolutionConfig(population_size=8, generations=3, sigma_init=0.1), tmp_path / "i2",
               progress=False)
    with pytest.raises(EvolutionError, match="parameter count"):
        evolve(fit, 5, EvolutionConfig(population_size=8, generations=1), tmp_path / "i3",
               init_from=tmp_path / "i1" / "best.npz", progress=False)
    # a stage may change the population size: the ES state depends only on the dimension
    r3 = evolve(fit, 6, EvolutionConfig(population_size=4, generations=1, eval_every=0), tmp_path / "i3b",
                init_from=tmp_path / "i1" / "best.npz", progress=False)
    assert r3.generation == best.generation + 1
    with pytest.raises(EvolutionError, match="does not exist"):
        evolve(fit, 6, cfg2, tmp_path / "i4", init_from=tmp_path / "nope.npz", progress=False)


def test_bad_config_and_sharding_errors():
    with pytest.raises(EvolutionError, match="sigma_init"):
        EvolutionConfig(sigma_init=0)
    with pytest.raises(EvolutionError, match="divisible"):
        population_sharding(6, devices=[object()] * 4)
    assert population_sharding(32, devices=jax.devices()[:1]) is None
