"""The README cannot drift: every command in its ```bash blocks is checked against the code.

- `star ...`, `.venv/bin/star ...`, `python -m star ...` (also after torchrun / srun / env
  assignments): the subcommand exists; the command, with `--help` appended, parses (so option
  values such as choices are checked) and every `--option` it uses appears in that help;
  `--config NAME` names a preset or an existing file; `key.sub=value` overrides are accepted
  by star.config (resolved against that preset, nothing runs). A command with a trailing
  comment `# ci: run` is run for real instead (in order, in one scratch directory).
- `sbatch slurm/X.sh`, `bash scripts/X.sh` and `bash .ci/run`: the script exists and `bash -n` parses it.
- `ruff check PATHS`: the paths exist.
- `python path/to/script.py`: the file exists and compiles; `python -m pytest PATHS`: the
  test paths exist.
- Commands of other tools (pip, git, nvidia-smi, ...) are listed in EXTERNAL; anything else
  fails, so a new kind of README command has to be taught here rather than go unchecked.

Set STAR_README=PATH to check another file (a draft) the same way.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = Path(os.environ.get("STAR_README", REPO / "README.md"))
RUN_MARK = re.compile(r"#\s*ci:\s*run\s*$")
# Programs whose commands are not ours to check (their own docs cover them).
EXTERNAL = {"pip", "pip3", "git", "cd", "source", "export", "ls", "cat", "mkdir", "rm", "cp", "mv", "tail",
            "head", "watch", "nvidia-smi", "tensorboard", "squeue", "scancel", "sacct", "scontrol", "sinfo",
            "salloc", "du", "df", "echo", "apt-get", "sudo", "conda", "uv", "curl", "wget", "tar", "find"}
# Launchers that run `star` (or `-m star`) further along the same command line.
LAUNCHERS = {"torchrun", "srun", "deepspeed", "env", "time", "nohup", "mpirun"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ";;"}
PLACEHOLDER = re.compile(r"[$<>{}]|\.\.\.")


@dataclass(frozen=True)
class ReadmeCommand:
    line: int                 # 1-based line in the README where the command starts
    tokens: tuple[str, ...]   # one simple command (no &&, ;, |), continuation lines joined
    run: bool                 # marked `# ci: run`

    @property
    def text(self) -> str:
        return shlex.join(self.tokens)

    def __str__(self) -> str:
        return f"README line {self.line}: {self.text}"


def bash_blocks(markdown: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every ```bash fenced block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        stripped = line.strip()
        if current is None and re.fullmatch(r"```\s*(bash|sh|shell|console)\s*", stripped):
            current, start = [], number + 1
        elif current is not None and stripped.startswith("```"):
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    if current is not None:
        raise AssertionError(f"unterminated ```bash block starting at line {start - 1}")
    return blocks


def simple_commands(text: str) -> list[list[str]]:
    """Shell words of each simple command in ``text``: comments dropped, split at && || ; | &."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    groups: list[list[str]] = [[]]
    for token in lexer:
        if token in SHELL_OPERATORS:
            groups.append([])
        else:
            groups[-1].append(token)
    return [g for g in groups if g]


def extract_commands(markdown: str) -> list[ReadmeCommand]:
    commands = []
    for start, lines in bash_blocks(markdown):
        i = 0
        while i < len(lines):
            first, text = i, lines[i].rstrip()
            while text.endswith("\\") and i + 1 < len(lines):  # continuation lines
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            text = text.strip().removeprefix("$ ")
            run = bool(RUN_MARK.search(text))
            for tokens in simple_commands(text):
                commands.append(ReadmeCommand(start + first, tuple(tokens), run))
    return commands


def star_args(tokens: list[str]) -> list[str] | None:
    """The arguments after `star` / `-m star` in a command, or None when it does not run star."""
    for i, token in enumerate(tokens):
        if token == "star" or token.endswith("/star"):
            return tokens[i + 1:]
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "star":
            return tokens[i + 2:]
    return None


def program(tokens: list[str]) -> tuple[str, list[str]]:
    """The program name (basename) and its arguments, after leading VAR=value assignments."""
    i = 0
    while i < len(tokens) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[i]):
        i += 1
    if i == len(tokens):
        return "", []
    return os.path.basename(tokens[i]), tokens[i + 1:]


def star_help(argv: list[str]) -> tuple[int, str]:
    """Run `star ARGV --help` in this process; (exit code, help text + errors)."""
    from star.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*argv, "--help"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return int(code or 0), out.getvalue() + err.getvalue()


def check_star(args: list[str]) -> list[str]:
    """Problems of one `star ...` command (an empty list when it matches the code)."""
    from star.cli import COMMANDS
    from star.config import ConfigError, list_presets, load_config

    if not args:
        return []  # bare `star` prints its usage
    if args[0] in ("-h", "--help", "-V", "--version"):
        return []
    if args[0] not in COMMANDS:
        return [f"`star {args[0]}` is not a command (known: {', '.join(COMMANDS)})"]
    problems = []
    code, text = star_help(args)
    if code != 0:
        problems.append(f"`star {shlex.join(args)} --help` exits {code}:\n{text[-1500:]}")
    for token in args[1:]:
        if token.startswith("--") and len(token) > 2:
            flag = token.split("=", 1)[0]
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"option {flag} is not in `star {args[0]} --help`")
    config = None
    for i, token in enumerate(args):
        value = args[i + 1] if token == "--config" and i + 1 < len(args) else \
            token.split("=", 1)[1] if token.startswith("--config=") else None
        if value is None or PLACEHOLDER.search(value):
            continue
        if value in list_presets() or (REPO / value).is_file():
            config = value
        else:
            problems.append(f"--config {value}: no such preset (presets: {', '.join(list_presets())})")
    overrides = [t for t in args[1:] if "=" in t and not t.startswith("-") and re.match(r"[A-Za-z_][\w.]*=", t)]
    if overrides:
        try:
            load_config(config, overrides)
        except ConfigError as exc:
            problems.append(f"overrides {overrides} rejected: {exc}")
    return problems


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def check_python_code(code: str) -> list[str]:
    """`python -c CODE`: it compiles, and every name it imports exists (nothing else runs)."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return [f"python -c code does not parse: {exc}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"no module {a.name}" for a in node.names if not module_exists(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                problems.append(f"cannot import {node.module}: {exc}")
                continue
            problems += [f"{node.module} has no {a.name}" for a in node.names
                         if a.name != "*" and not hasattr(module, a.name)
                         and not module_exists(f"{node.module}.{a.name}")]
    return problems


def _shell_script(path: str) -> list[str]:
    script = REPO / path
    if not script.is_file():
        return [f"{path} does not exist"]
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    return [] if proc.returncode == 0 else [f"`bash -n {path}` fails: {proc.stderr.strip()}"]


def check_command(command: ReadmeCommand) -> list[str]:
    """Problems of one README command, checked without running it."""
    tokens = list(command.tokens)
    name, args = program(tokens)
    if not name:
        return []
    star = star_args(tokens)
    if star is not None and (name in ("star", "python", "python3") or name in LAUNCHERS or name.endswith("python")
                             or tokens[0].endswith("/star")):
        return check_star(star)
    if name == "sbatch" or name == "bash" or name == "sh":
        # the script is the first argument that is not an option (`.ci/run` has no .sh suffix)
        scripts = [a for a in args if a.endswith(".sh")] or [a for a in args if not a.startswith("-")][:1]
        if not scripts:
            return [f"{name} without a .sh script: {command.text}"]
        return _shell_script(scripts[0])
    if name.startswith("python"):
        if args[:2] == ["-m", "pytest"] or args[:1] == ["pytest"]:
            paths = [a.split("::")[0] for a in args[2:] if not a.startswith("-") and "/" in a]
            return [f"{p} does not exist" for p in paths if not (REPO / p).exists()]
        if args[:1] == ["-m"] and len(args) > 1:
            return [] if module_exists(args[1]) else [f"`python -m {args[1]}`: no such module"]
        if args[:1] == ["-c"] and len(args) > 1:
            return check_python_code(args[1])
        scripts = [a for a in args if a.endswith(".py")]
        if scripts:
            path = REPO / scripts[0]
            if not path.is_file():
                return [f"{scripts[0]} does not exist"]
            proc = subprocess.run([sys.executable, "-m", "py_compile", str(path)], capture_output=True, text=True)
            return [] if proc.returncode == 0 else [f"{scripts[0]} does not compile: {proc.stderr.strip()}"]
        return [f"unchecked python command: {command.text} (teach tests/test_readme.py about it)"]
    if name == "pytest":
        paths = [a.split("::")[0] for a in args if not a.startswith("-") and "/" in a]
        return [f"{p} does not exist" for p in paths if not (REPO / p).exists()]
    if name == "ruff":
        paths = [a for a in args[1:] if not a.startswith("-")]
        if args[:1] != ["check"]:
            return [f"unchecked ruff command: {command.text} (teach tests/test_readme.py about it)"]
        return [f"{p} does not exist" for p in paths if not (REPO / p).exists()]
    if name in EXTERNAL:
        return []
    return [f"unknown program {name!r}: add it to EXTERNAL in tests/test_readme.py if it is not ours, "
            f"or teach the test to check it"]


def _readme_commands() -> list[ReadmeCommand]:
    return extract_commands(README.read_text()) if README.is_file() else []


COMMANDS = _readme_commands()


def test_readme_exists_and_has_commands():
    assert README.is_file(), f"{README} is missing"
    assert COMMANDS, f"no ```bash commands found in {README}"
    assert any(star_args(list(c.tokens)) is not None for c in COMMANDS), "the README runs no `star` command"


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.run], ids=str)
def test_readme_command_matches_the_code(command):
    problems = check_command(command)
    assert not problems, f"{command}\n" + "\n".join(problems)


@pytest.mark.slow
def test_readme_commands_marked_ci_run_succeed(tmp_path):
    """`# ci: run` commands run for real, in README order, in one scratch directory."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for command in [c for c in COMMANDS if c.run]:
        tokens = list(command.tokens)
        star = star_args(tokens)
        argv = [sys.executable, "-m", "star", *star] if star is not None else tokens
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (
            f"{command} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


# ----------------------------------------------------------------------------- the checker itself

DRIFTED = """
Some text.

```bash
star pretrain --config no_such_preset
star pretrain --config smoke optim.lr=1e-3
star finetune --config smoke_finetune --no-such-flag
star frobnicate --fast
sbatch slurm/no_such_script.sh
frobctl start
python -c "from star.config import no_such_function"
python -m no_such_module_xyz
```
"""

GOOD = """
```bash
# a comment line
STAR_KERNELS=torch python -m star pretrain --config smoke \\
    --run-dir runs/x optim.base_lr=2e-4 schedule.epochs=2   # a trailing comment
.venv/bin/star demo --out demo_out && pip install -e .
star synth --out d --classes 2 --per-class 2   # ci: run
python -c "from star.ops import describe_kernels; print(describe_kernels())"
python3 -m venv .venv
```
"""


def test_extract_commands_joins_continuations_and_splits_chains():
    commands = extract_commands(GOOD)
    texts = [c.text for c in commands]
    assert texts[0].startswith("STAR_KERNELS=torch python -m star pretrain --config smoke --run-dir runs/x")
    assert texts[0].endswith("schedule.epochs=2") and commands[0].line == 4
    assert texts[1:3] == [".venv/bin/star demo --out demo_out", "pip install -e ."]
    assert [c.run for c in commands] == [False, False, False, True, False, False]


def test_good_commands_pass():
    problems = [p for c in extract_commands(GOOD) for p in check_command(c)]
    assert problems == []


def test_checker_catches_each_kind_of_drift():
    problems = [check_command(c) for c in extract_commands(DRIFTED)]
    assert len(problems) == 8 and all(problems), problems
    preset, key, flag, sub, script, unknown, code, module = ("\n".join(p) for p in problems)
    assert "no_such_preset" in preset and "no such preset" in preset
    assert "optim.lr" in key and "optim.base_lr" in key  # star.config's suggestion
    assert "--no-such-flag" in flag
    assert "frobnicate" in sub
    assert "slurm/no_such_script.sh does not exist" in script
    assert "frobctl" in unknown
    assert "star.config has no no_such_function" in code
    assert "no_such_module_xyz" in module
