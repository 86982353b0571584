"""Benchmarks, one command each; each writes its measurements to a JSON file (``--out``).

    python -m experiments.bench.fitness     # candidate evaluations per second of the fitness backends
    python -m experiments.bench.policy      # one NAMM policy update against the forward pass that triggers it
    python -m experiments.bench.runtime     # prefill time, decode time per token and KV bytes of the KV policies
    python -m experiments.bench.verify      # a speculative verification call against a one-token decode step
"""
