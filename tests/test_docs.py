"""The docs cannot rot: every command README.md and docs/*.md show still parses and names what exists.

A command is a line of a fenced shell block (```bash, ```sh, ```shell, ```console) that starts
with ``retina `` (after an optional ``$ `` prompt; ``\\`` continuations joined), or an inline code
span starting with ``retina `` in a table row (the results page gives each figure's command
there). Each one, without running it:
- parses with the real parser (``retina.cli.build_parser``); an unknown flag or verb fails;
- names a ``--config`` that resolves (``retina.config.find_config``), unless the line carries the
  marker ``(created above)``: the page writes that file itself;
- has ``--set`` keys that validate: ``load_config(config or "shapes", sets)``; a verb that takes
  ``--weights`` and no ``--config`` gets its config from the checkpoint, so its keys are checked
  against the schema only; ``--grid`` keys too.
``python -m retina ...`` and ``torchrun ... -m retina ...`` lines are checked the same way, and a
``python some/script.py`` line must name a script of the repository.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Iterator, Optional

import pytest

from retina.cli import build_parser
from retina.config import Config, config_to_dict, find_config, flat_keys, load_config
from retina.errors import RetinaError

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
CREATED = "(created above)"  # a --config the page itself writes: not looked up
SCHEMA_KEYS = tuple(flat_keys(config_to_dict(Config())))
_LOCAL_PACKAGES = ("benchmarks", "tools")  # python -m targets that must be in the repository


def shell_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, logical line) of the fenced shell blocks: ``$ `` dropped, ``\\`` joined."""
    fence: Optional[str] = None
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            continue
        if fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
            stripped = stripped[2:] if stripped.startswith("$ ") else stripped
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        yield start, pending + stripped
        pending = ""


def table_commands(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command) of the inline code spans starting with ``retina `` in table rows."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("|"):
            for span in re.findall(r"`([^`]+)`", line):
                if span.startswith(("retina ", "python ")):
                    yield number, span


def _retina_argv(words: list[str]) -> Optional[list[str]]:
    """The arguments after ``retina`` of a command line, or None when it does not run retina."""
    if words[:1] == ["retina"]:
        return words[1:]
    if words[:1] in (["python"], ["torchrun"]) and "-m" in words:
        i = words.index("-m")
        if words[i + 1:i + 2] == ["retina"]:
            return words[i + 2:]
    return None


def _schema_problem(key: str) -> Optional[str]:
    if any(k == key or k.startswith(key + ".") for k in SCHEMA_KEYS):
        return None
    return f"unknown config key '{key}'"


def _module_problems(module: str, argv: list[str]) -> list[str]:
    """A ``python -m MODULE`` of the repository (benchmarks.race): the module exists and declares
    each ``--flag`` used (its parser is built inside its main, so the flags are read from its text)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():
        return [f"no module {module} in the repository"] if module.split(".")[0] in _LOCAL_PACKAGES else []
    text = path.read_text(encoding="utf-8")
    flags = [w.split("=", 1)[0] for w in argv if w.startswith("--")]
    return [f"{module} declares no flag {f}" for f in flags if f'"{f}"' not in text]


def check_command(line: str) -> list[str]:
    """What is wrong with one documented command line (empty when nothing is)."""
    if line.split(" ", 1)[0] not in ("retina", "python", "torchrun"):
        return []
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:
        return [f"cannot split: {e}"]
    if words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
        return [] if (ROOT / words[1]).is_file() else [f"no script {words[1]} in the repository"]
    if words[:2] == ["python", "-m"] and len(words) > 2 and words[2] != "retina":
        return _module_problems(words[2], words[3:])
    argv = _retina_argv(words)
    if argv is None:
        return []
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(argv)
    except SystemExit:
        return ["does not parse: " + (stderr.getvalue().strip().splitlines() or ["(no message)"])[-1]]
    problems = []
    config = getattr(args, "config", None)
    if config and CREATED not in line and not find_config(config).is_file():
        problems.append(f"--config {config}: no such config")
    sets = list(getattr(args, "set", None) or [])
    grid_keys = [g.split("=", 1)[0] for g in getattr(args, "grid", None) or []]
    schema_only = CREATED in line or (getattr(args, "weights", None) and not config)
    if schema_only or problems:
        keys = [s.split("=", 1)[0] for s in sets]
        problems += [p for p in map(_schema_problem, keys + grid_keys) if p]
        return problems
    try:
        load_config(config or "shapes", sets)
    except RetinaError as e:
        problems.append(f"--set does not validate: {e}")
    return problems + [p for p in map(_schema_problem, grid_keys) if p]


def doc_problems(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: command: problem`` for every documented command of ``path`` that fails."""
    text = path.read_text(encoding="utf-8")
    found = []
    for number, line in [*shell_lines(text), *table_commands(text)]:
        for problem in check_command(line):
            found.append(f"{path.relative_to(root)}:{number}: {line}: {problem}")
    return found


def commands_of(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [line for _, line in [*shell_lines(text), *table_commands(text)]
            if _retina_argv(shlex.split(line, comments=True) or [""]) is not None]


# The checker itself -------------------------------------------------------------------------


def test_shell_lines_joins_continuations_and_drops_prompts():
    text = ("text\n```bash\n$ retina eval --weights runs/a \\\n    --set eval.batch_size=1\n```\n"
            "```yaml\nretina: not a command\n```\n```console\n$ retina data shapes\n```\n")
    assert list(shell_lines(text)) == [(3, "retina eval --weights runs/a --set eval.batch_size=1"),
                                       (10, "retina data shapes")]


def test_table_commands_reads_inline_code_of_table_rows_only():
    text = "| 66.2 | `retina train` | A |\nprose `retina eval --x`\n| `python tools/x.py` |\n"
    assert list(table_commands(text)) == [(1, "retina train"), (3, "python tools/x.py")]


def test_checker_accepts_good_commands():
    assert check_command("retina train --config photos_cpu --set data.root=data/p --out runs/p  # ok") == []
    assert check_command("retina eval --weights runs/shapes --set eval.backend=faster_coco_eval") == []
    assert check_command("torchrun --nproc-per-node 8 -m retina train --config shapes") == []
    assert check_command("ls runs/") == []  # not a retina command: not checked


def test_checker_fails_on_a_made_up_flag():
    problems = check_command("retina train --no-such-flag 3")
    assert len(problems) == 1 and problems[0].startswith("does not parse:")
    assert "--no-such-flag" in problems[0]


def test_checker_fails_on_a_made_up_set_key():
    problems = check_command("retina train --set loss.gama=1")
    assert len(problems) == 1 and "loss.gama" in problems[0] and "gamma" in problems[0]  # did you mean
    # a --weights verb: the schema decides
    assert check_command("retina eval --weights runs/a --set data.rooot=x") == [
        "unknown config key 'data.rooot'"]


def test_checker_fails_on_a_missing_config_unless_marked_created():
    assert check_command("retina train --config no_such_config") == ["--config no_such_config: no such config"]
    assert check_command("retina train --config my.yaml --set loss.gamma=1  # (created above)") == []
    assert check_command("retina train --config my.yaml --set loss.gama=1  # (created above)") == [
        "unknown config key 'loss.gama'"]


def test_checker_checks_grid_keys_and_scripts():
    assert check_command("retina ablate --config shapes --grid loss.gamm=0,1") == [
        "unknown config key 'loss.gamm'"]
    assert check_command("python tools/no_such_script.py --x") == [
        "no script tools/no_such_script.py in the repository"]
    assert check_command("python -m benchmarks.no_such_module") == [
        "no module benchmarks.no_such_module in the repository"]
    assert check_command("python -m benchmarks.race --root data/p --no-such-flag 1") == [
        "benchmarks.race declares no flag --no-such-flag"]
    assert check_command("python -m benchmarks.race --root data/p --budget-min 15") == []


def test_doc_problems_names_the_file_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# p\n\n```sh\nretina train --bogus\n```\n")
    (problem,) = doc_problems(page, root=tmp_path)
    assert problem.startswith("page.md:4: retina train --bogus: does not parse:")


# The docs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_parse_and_validate(path):
    assert doc_problems(path) == []


def test_docs_show_commands():
    assert len(commands_of(ROOT / "README.md")) >= 5
    assert sum(len(commands_of(p)) for p in DOC_FILES) >= 60


def test_readme_gives_the_two_fresh_machine_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [line for _, line in shell_lines(text)]
    assert "pip install -e . && retina train" in lines
    assert 'pip install -e ".[test]" && pytest -q' in lines  # what .ci/run runs
    assert 'pip install -e ".[test]" && pytest -q' in (ROOT / ".ci" / "run").read_text()


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_heading_anchors_follow_github():
    assert heading_anchors("# Results\n## The default: `retina train`\nx\n") == {
        "results", "the-default-retina-train"}


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    missing = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if "://" in target:
            continue
        page = path.parent / target if target else path
        if not page.exists():
            missing.append(target)
        elif anchor and page.suffix == ".md" and anchor not in heading_anchors(page.read_text(encoding="utf-8")):
            missing.append(f"{target}#{anchor}")
    assert missing == []


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_point_at_nothing_a_user_lacks(path):
    text = path.read_text(encoding="utf-8")
    assert "../shared" not in text
    pattern = r"\b(issue [0-9]+|this stop|the stops? before|these sessions|sittings?)\b"
    assert re.findall(pattern, text, flags=re.IGNORECASE) == []
