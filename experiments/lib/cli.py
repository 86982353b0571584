"""Command-line plumbing shared by the experiment scripts: which exceptions are bad input, and the Hydra
entry point that reports them as one line instead of a traceback.

Exception classes are imported lazily, so that this module imports neither framework.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

def policy_yaml(name: str) -> dict | None:
    """``configs/policy/<name>.yaml`` as a plain dict (its ``defaults`` list dropped), or None where there is none."""
    from omegaconf import OmegaConf

    path = CONFIG_DIR / "policy" / f"{name}.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cfg.pop("defaults", None)
    return cfg


# Bad input (a missing asset, a policy or draft for another model, a config typo).
USER_ERRORS = (("experiments.lib.models", "ModelSpecError"), ("experiments.lib.assets", "AssetError"),
               ("experiments.tasks", "TaskError"), ("namm.torch.policies", "PolicyConfigError"),
               ("namm.torch.policy", "PolicyFormatError"), ("namm.torch.cache", "CacheConfigError"),
               ("spec_decode.torch.draft", "DraftMismatchError"), ("spec_decode.torch.draft", "CorruptDraftError"),
               ("namm.torch.generate", "ContextLengthError"))


# Errors of the NAMM pipeline's own stages (a shard store from another config, an empty population, ...).
PIPELINE_ERRORS = (("namm.evolve", "EvolutionError"), ("namm.fitness", "FitnessError"), ("namm.shards", "ShardError"),
                   ("experiments.extract", "ExtractError"), ("namm.config", "ConfigError"), ("namm.export", "ExportError"))


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


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name, overrides=overrides)


def override_problem(config_name: str, argv: Sequence[str]) -> str | None:
    """What is wrong with the command-line overrides ``argv`` of ``configs/<config_name>.yaml``, as one line, or
    None when they compose (or fail in a way Hydra reports well itself, e.g. a sweep outside ``--multirun``).

    Covers a key that does not exist (``policy.thresold=0.5``: the keys that node takes, the closest one, and
    ``+key=`` for a new key) and a config group option that does not exist (``policy=nope``: the options).
    """
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import DictConfig

    overrides = [a for a in argv if not a.startswith("-")]
    pairs = [(a.split("=", 1)[0].lstrip("+~"), a.split("=", 1)[1]) for a in overrides if "=" in a]
    try:
        _compose(config_name, overrides)
        return None
    except MissingConfigException as e:
        options = [str(o) for o in (getattr(e, "options", None) or [])]
        group, value = next(((g, v) for g, v in pairs if f"'{g}/{v}'" in str(e)), (None, None))
        if group is None or not options:
            return None
        close = difflib.get_close_matches(value, options, n=1)
        return (f"unknown {group} {value!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                f"use one of: {', '.join(options)}")
    except ConfigCompositionException as e:
        key = getattr(e.__cause__, "full_key", None)
        bad = next((a for a in overrides if key and a.split("=", 1)[0] == key), None)
        if bad is None or not str(e).startswith("Could not override"):
            return None
        parent, _, leaf = key.rpartition(".")
        keys, label = [], parent or config_name
        try:  # the keys of the node the override meant, from the config composed without it
            cfg = _compose(config_name, [a for a in overrides if a != bad])
            from omegaconf import OmegaConf

            node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig):
                keys = sorted(str(k) for k in node.keys())
                if parent and isinstance(node.get("name"), str):
                    label = f"{parent} {node.get('name')!r}"
        except Exception:  # noqa: BLE001 - a second problem: Hydra reports it once this one is fixed
            pass
        close = difflib.get_close_matches(leaf, keys, n=1)
        return (f"unknown key {key!r} in {bad}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                + (f"{label} takes: {', '.join(keys)}; " if keys else "")
                + f"to add a new key write +{bad}")
    except Exception:  # noqa: BLE001 - anything else is Hydra's to report
        return None


def check_overrides(prog: str, config_name: str, argv: Sequence[str] | None = None) -> None:
    """Exit with the one line ``<prog>: ...`` (status 1) when a command-line override names a key or a config
    option that does not exist (Hydra's own report of that spans several lines); see ``override_problem``."""
    problem = override_problem(config_name, sys.argv[1:] if argv is None else argv)
    if problem:
        raise SystemExit(f"{prog}: {problem}")


def hydra_entry(config_name: str, fn: Callable) -> None:
    """Run ``fn(cfg)`` as the Hydra app ``configs/<config_name>.yaml``, through ``run_reporting_errors``;
    a mistyped override is one line first (``check_overrides``)."""
    import hydra

    check_overrides(config_name, config_name)

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)
    def main(cfg):
        run_reporting_errors(fn, cfg)

    main()
