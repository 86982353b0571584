"""Command-line plumbing shared by the experiment scripts: which exceptions are bad input, and the Hydra
entry point that reports them as one line instead of a traceback.

Exception classes are imported lazily, so that this module imports neither framework.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# Bad input (a missing asset, a policy or draft for another model, a config typo).
USER_ERRORS = (("experiments.models", "ModelSpecError"), ("experiments.assets", "AssetError"),
               ("experiments.tasks", "TaskError"), ("namm.torch.policies", "PolicyConfigError"),
               ("namm.torch.policy", "PolicyFormatError"), ("namm.torch.cache", "CacheConfigError"),
               ("spec_decode.torch.draft", "DraftMismatchError"), ("spec_decode.torch.draft", "CorruptDraftError"))


# Errors of the NAMM pipeline's own stages (a shard store from another config, an empty population, ...).
PIPELINE_ERRORS = (("namm.evolve", "EvolutionError"), ("namm.fitness", "FitnessError"), ("namm.shards", "ShardError"),
                   ("experiments.extract", "ExtractError"), ("namm.config", "ConfigError"))


def _classes(names) -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    for mod, name in names:
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes of ``USER_ERRORS`` that import here."""
    return _classes(USER_ERRORS)


def pipeline_errors() -> tuple[type[BaseException], ...]:
    """The exception classes of ``PIPELINE_ERRORS`` and ``USER_ERRORS`` that import here."""
    return _classes(PIPELINE_ERRORS) + user_errors()


def exit_on_bad_input(prog: str, fn: Callable, cfg, extra: tuple[type[BaseException], ...] = ()):
    """``fn(cfg)``; bad input (``user_errors()`` and ``extra``) ends the process with the one-line message
    ``<prog>: ...`` and exit status 1 instead of a traceback."""
    try:
        return fn(cfg)
    except extra + user_errors() as e:
        raise SystemExit(f"{prog}: {e}") from None


def run_reporting_errors(fn: Callable, cfg) -> None:
    """``fn(cfg)``; a pipeline or input error is printed as one line, ``error: ...``, on stderr, and the
    process exits with status 2."""
    try:
        fn(cfg)
    except pipeline_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def hydra_entry(config_name: str, fn: Callable) -> None:
    """Run ``fn(cfg)`` as the Hydra app ``configs/<config_name>.yaml``, through ``run_reporting_errors``."""
    from pathlib import Path

    import hydra

    @hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "configs"), config_name=config_name,
                version_base=None)
    def main(cfg):
        run_reporting_errors(fn, cfg)

    main()
