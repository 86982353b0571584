"""The README's (and the Makefile's) Hydra commands parse and compose (argument order, config group names, override keys)."""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser

ROOT = Path(__file__).resolve().parents[1]
HYDRA_APPS = {"train_namm", "evaluate", "main", "extract", "distill_draft", "extract_teacher", "specbench",
              "prepare"}  # their config is configs/<name>.yaml


def _commands():
    text = ROOT.joinpath("README.md").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        m = re.search(r"python -m experiments\.(\w+)(.*?)(?:`|$)", line)
        if m and m.group(1) in HYDRA_APPS:
            out.append((m.group(1), re.sub(r"\s+#.*$", "", m.group(2)).replace("$s", "i1").strip()))
    for line in ROOT.joinpath("Makefile").read_text().splitlines():     # make run / drafts / prepare
        m = re.search(r"python -m experiments\.(\w+)(.*)$", line)
        if m and m.group(1) in HYDRA_APPS and line.startswith("\t"):                 # recipe lines only
            out.append((m.group(1), m.group(2).replace("$$", "$").strip()))
    return out


COMMANDS = _commands()


def test_the_readme_has_hydra_commands():
    assert len(COMMANDS) >= 10 and any("-m" in args.split() for _, args in COMMANDS)


@pytest.mark.parametrize("app,args", COMMANDS, ids=[f"{a}:{b[:40]}" for a, b in COMMANDS])
def test_readme_command_parses_and_composes(app, args):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ns = get_args_parser().parse_args(shlex.split(args))   # -m after an override is an argparse error
    point = []                                             # one job of a sweep: the first value of each sweep
    for o in OverridesParser.create().parse_overrides([o for o in ns.overrides if not o.startswith("hydra")]):
        value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
        point.append(f"{o.get_key_element()}={value}" if not o.is_delete() else o.get_key_element())  # ~key
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        compose(app, overrides=point)
