"""The README's commands and links work: its (and the Makefile's) Hydra commands parse and compose (argument order,
config group names, override keys), every `python -m` module it names exists, every `make` target it names is a
Makefile target, and every relative link (in the README and in docs/results.md) points to an existing file and,
with an anchor, an existing heading."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HYDRA_APPS = {"train_namm", "evaluate", "main", "extract", "distill_draft", "extract_teacher", "specbench",
              "prepare"}  # their config is configs/<name>.yaml


def _commands():
    text = README.read_text().replace("\\\n", " ")
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
MODULES = sorted(set(re.findall(r"python -m ([A-Za-z_][\w.]*\w)", README.read_text())))
MAKE_TARGETS = sorted(set(re.findall(r"(?<![\w-])make ([a-z][\w-]*)", README.read_text())))
RESULTS = ROOT / "docs" / "results.md"                                  # the README's results history


def _links(path: Path) -> list[str]:
    """The relative links of a Markdown file (no scheme such as http: or mailto:)."""
    return sorted(set(m for m in re.findall(r"\]\(([^)\s]+)\)", path.read_text())
                      if not re.match(r"[a-z][a-z0-9+.-]*:", m)))


LINKS = [(README, link) for link in _links(README)] + [(RESULTS, link) for link in _links(RESULTS)]


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


def test_the_readme_names_modules_targets_and_links():
    assert {"experiments.train_namm", "experiments.evaluate"} <= set(MODULES)
    assert {"run", "test"} <= set(MAKE_TARGETS)
    assert any(link.startswith("docs/results.md#") for _, link in LINKS)


def _module_exists(name: str) -> bool:
    """``python -m name`` from the repository root would find it (a missing parent package counts as missing)."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
    finally:
        sys.path.remove(str(ROOT))


@pytest.mark.parametrize("module", MODULES)
def test_readme_module_exists(module):
    assert _module_exists(module), f"README runs python -m {module}, which does not exist; fix the module path"


def _makefile_targets() -> set[str]:
    text = ROOT.joinpath("Makefile").read_text()
    return {t for line in re.findall(r"^([\w.$()/ -]+):(?!=)", text, re.M) for t in line.split()}


@pytest.mark.parametrize("target", MAKE_TARGETS)
def test_readme_make_target_exists(target):
    assert target in _makefile_targets(), f"README runs make {target}, which the Makefile does not define"


def github_anchor(heading: str, seen: dict[str, int]) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped (letters, digits, '_', '-' and spaces
    kept), spaces as '-'; a repeated id gets -1, -2, ... in order."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)         # a link in a heading: its text
    base = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
    n = seen.get(base, 0)
    seen[base] = n + 1
    return base if n == 0 else f"{base}-{n}"


def anchors(path: Path) -> set[str]:
    """Every heading id of a Markdown file (headings inside fenced code blocks are not headings)."""
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            out.add(github_anchor(m.group(1), seen))
    return out


def test_github_anchor():
    seen: dict[str, int] = {}
    assert github_anchor("SnapKV under one eviction at the end of the prefill, 50 %", seen) == \
        "snapkv-under-one-eviction-at-the-end-of-the-prefill-50-"
    assert github_anchor("The `make drafts` drafts", seen) == "the-make-drafts-drafts"
    assert github_anchor("The `make drafts` drafts", seen) == "the-make-drafts-drafts-1"


@pytest.mark.parametrize("source,link", LINKS, ids=[f"{s.name}:{link}" for s, link in LINKS])
def test_link_resolves(source, link):
    path, _, anchor = link.partition("#")
    target = (source.parent / path).resolve() if path else source
    assert target.is_file(), f"{source.name} links to {path}, which does not exist; fix the link"
    if anchor:
        assert anchor in anchors(target), f"{source.name} links to {link}, but {target.name} has no such heading"
