"""Every code block in README.md, docs/*.md and docs/experiments/*.md is checked, so the docs
cannot drift from the code.

Each Python, TOML and text block, and each command of a shell block, gets one check. The rules
in :func:`classify_command` and :func:`classify_block` choose it from the content; a comment on
the line before the fence overrides them for the whole block::

    <!-- doc-test: run | parse | help | skip: why -->

- **run**, offline: ``broker`` commands in-process with a config and state dir of their own and
  no cloud keys, so ``local`` (this machine, $0/h) is the only provider; Python blocks in a fresh
  interpreter outside the repo; the simulator's "in your own tests" example with pytest outside
  the repo; the simulator's command-line block against a real simulator; transcripts (``$ cmd``
  followed by its output) compared; TOML snippets loaded as the config file; query examples
  parsed.
- **parse**: a command that needs a cloud account, a rented instance or a real SSH host goes
  through the CLI's own parser (every subcommand, flag and argument must exist), not run. Such
  Python blocks are compiled and checked for undefined names, as every Python block is.
- **help**: an experiment script (it runs a real experiment) must answer ``--help``.
- **skip**, with the reason in the report (``pytest -rs``).

A block or command no rule recognises fails, so a new doc block needs a rule or a marker.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted(
    [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "docs" / "experiments").glob("*.md"),
    ]
)
CLOUDS = ("runpod", "primeintellect", "lambdalabs", "vast")
# Environment that could reach a real account or the developer's own config.
_LEAKY_ENV = (
    "RUNPOD_API_KEY",
    "RUNPOD_API_URL",
    "PRIME_API_KEY",
    "PRIME_INTELLECT_API_KEY",
    "LAMBDA_API_KEY",
    "VAST_API_KEY",
    "BROKER_PROVIDERS",
    "BROKER_SSH_HOSTS",
    "BROKER_DEFAULT_TTL",
    "BROKER_BUDGET",
    "BROKER_MAX_PRICE_PER_HOUR",
    "COLUMNS",
)
_MARKER = re.compile(r"<!--\s*doc-test:\s*(run|parse|help|skip)\s*(?::\s*(.*?))?\s*-->")
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M
)


@dataclass
class Block:
    """One fenced code block."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    marker: tuple[str, str] | None = None  # (action, reason) from a doc-test comment

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass
class Check:
    """One test item: a block, or one command of a shell block."""

    block: Block
    action: str  # run | parse | help | skip
    reason: str
    # broker | bifrost | script | python | pytest | sim | sim-client | transcript | toml | query
    kind: str
    text: str = ""
    line: int = 0
    argv: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        lines = (self.text or self.block.body).strip().splitlines()
        first = lines[0][:60] if lines else ""
        return f"{self.block.path.relative_to(ROOT)}:{self.line or self.block.line} {first}"


def doc_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown file, with any doc-test marker before them."""
    text = path.read_text()
    blocks = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        marker = _MARKER.search(before[-1]) if before else None
        blocks.append(
            Block(
                path=path,
                line=text[: m.start()].count("\n") + 1,
                lang=m.group("lang").lower(),
                body=textwrap.dedent(m.group("body")),
                marker=(marker.group(1), marker.group(2) or "marked in the doc")
                if marker
                else None,
            )
        )
    return blocks


def shell_commands(body: str) -> Iterator[tuple[int, str]]:
    """(0-based line offset, command) for each command of a shell block: continuation lines
    joined, comments dropped, `a; b` and `a && b` split."""
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        # Joined: `\` continuations, and the indented `[--opt X]` lines of a usage synopsis.
        while i + 1 < len(lines) and (
            text.rstrip().endswith("\\") or re.match(r"\s+[\[-]", lines[i + 1])
        ):
            i += 1
            text = text.rstrip().removesuffix("\\") + " " + lines[i].strip()
        i += 1
        stripped = re.sub(r"\s{2,}#.*$", "", text.strip())  # a trailing comment
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("python3 -m pip install"):
            yield start, stripped  # one install line, kept whole
            continue
        lexer = shlex.shlex(stripped, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            words = list(lexer)
        except ValueError:
            yield start, stripped
            continue
        if not {";", "&&"} & set(words):
            yield start, stripped
            continue
        part: list[str] = []
        for w in [*words, ";"]:
            if w in (";", "&&"):
                if part:
                    yield start, shlex.join(part)
                part = []
            else:
                part.append(w)


_PROGRAMS = ("broker", "bifrost", "uv", "python", "python3", "deploy.py", "deploy_sweep.py")


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return command.split()


def _strip_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        k, _, v = words[0].partition("=")
        env[k] = v
        words = words[1:]
    return env, words


def _strip_uv_run(words: list[str]) -> list[str]:
    """`uv run [--locked] [--extra X] cmd ...` -> `cmd ...` (the tests already run in that env)."""
    if words[:2] != ["uv", "run"]:
        return words
    rest = words[2:]
    while rest and rest[0].startswith("-"):
        takes_value = rest[0] in ("--extra", "--group", "--with", "--python", "--directory")
        rest = rest[2:] if takes_value else rest[1:]
    return rest


def _script(block: Block, words: list[str]) -> list[str] | None:
    """The `python ...` argv that starts an experiment script or module (without its args)."""
    if words and words[0] in ("python", "python3"):
        if words[1:2] == ["-m"] and len(words) > 2:
            return ["-m", words[2]]
        if len(words) > 1 and words[1].endswith(".py"):
            return [words[1]]
        return None
    if words and words[0].endswith(".py"):  # `deploy.py --model 03` in the experiment's own doc
        here = ROOT / "experiments" / block.path.stem / words[0]
        return [str(here.relative_to(ROOT))] if here.is_file() else None
    return None


def classify_command(block: Block, offset: int, command: str) -> Check:
    """The check for one command of a shell block."""
    line = block.line + 1 + offset
    words = _words(command)

    def check(action: str, reason: str, kind: str, argv: list[str] | None = None) -> Check:
        return Check(block, action, reason, kind, command, line, argv or [])

    if command.startswith("python3 -m pip install"):
        return check(
            "skip", "installs uv and this project's environment (the one tests run in)", "none"
        )
    if "|" in words:  # `cmd | grep x`: the command is what the docs promise works
        words = words[: words.index("|")]
    if words[:1] == ["source"]:
        return check("skip", "loads shell completion into your shell", "none")
    env, words = _strip_env(words)
    words = _strip_uv_run(words)
    if not words:
        return check("fail", "not a command", "none")
    if "..." in words or "/" in words:
        return check("skip", "a placeholder line (`...`, `a / b`), not a command", "none")
    prog = words[0]
    if prog == "broker":
        args = words[1:]
        if block.marker:
            return check(block.marker[0], block.marker[1], "broker", args)
        if env.get("RUNPOD_API_URL"):
            return check("run", "at the RunPod simulator its block starts", "sim-client", args)
        if args[:1] == ["create"] and not _asks_only_local(args):
            return check("parse", "rents on a cloud: needs an API key and money", "broker", args)
        if any(re.fullmatch(r"broker-[0-9a-f]+", a) for a in args):
            return check("parse", "names an example instance", "broker", args)
        if args[:1] in (["launch"], ["sweep"]) and not {"-h", "--help"} & set(args):
            return check(
                "parse", "runs whole jobs: tests/broker/test_launch.py runs them", "broker", args
            )
        if {"--install-completion", "--show-completion"} & set(args):
            return check("parse", "edits or prints your shell's startup files", "broker", args)
        if _cloud_providers(args):
            return check("parse", "asks a cloud provider: needs its API key", "broker", args)
        return check("run", "offline (the local provider only)", "broker", args)
    if prog == "bifrost":
        return check("parse", "needs an SSH host (an example address)", "bifrost", words[1:])
    script = _script(block, words)
    if script == ["-m", "broker.testing.runpod_sim"]:
        return check("run", "the simulator, with the block's other lines", "sim", words[1:])
    if script is not None and (ROOT / "experiments").exists():
        target = script[1] if script[0] == "-m" else script[0]
        if target.startswith("experiments"):
            return check("help", "runs a real experiment: checked with --help", "script", script)
    return check("fail", f"no rule for {prog!r} commands", "none")


def _asks_only_local(args: list[str]) -> bool:
    provs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--provider", "-p")]
    return bool(provs) and set(provs) == {"local"}


def _cloud_providers(args: list[str]) -> list[str]:
    provs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--provider", "-p")]
    return [p for p in provs if p in CLOUDS]


def classify_block(block: Block) -> list[Check]:
    """The checks for one block (one per command for shell blocks)."""
    lang = block.lang
    shell_like = lang in ("bash", "sh", "shell", "console") or (
        lang == "" and any(c.split()[0] in _PROGRAMS for _, c in shell_commands(block.body))
    )
    if shell_like:
        return [classify_command(block, off, cmd) for off, cmd in shell_commands(block.body)]

    def one(action: str, reason: str, kind: str) -> list[Check]:
        if block.marker:
            action, reason = block.marker
        return [Check(block, action, reason, kind)]

    if lang == "":
        return one("skip", "a diagram or formula, not code", "none")
    if lang == "python":
        if re.search(r"^def test_", block.body, re.M):
            return one("run", "a pytest module, run outside the repo", "pytest")
        if re.search(r"\.create\(|\bHost\(|\bGroup\(", block.body):
            return one("parse", "rents on a cloud or needs an SSH host: compiled only", "python")
        return one("run", "offline (the local provider only)", "python")
    if lang == "text":
        if block.body.lstrip().startswith("$ "):
            return one("run", "a transcript: the output must match", "transcript")
        if block.path.name == "query.md":
            return one("run", "a query example: must parse", "query")
        return one("skip", "prose", "none")
    if lang == "toml":
        return one("run", "loaded as the config file", "toml")
    if lang in ("yaml", "yml"):
        return one("run", "loaded as a task or sweep file", "yaml")
    return one("fail", f"no rule for {lang!r} blocks", "none")


def all_checks() -> list[Check]:
    return [c for path in DOC_FILES for b in doc_blocks(path) for c in classify_block(b)]


CHECKS = all_checks()


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A config, state dir and bifrost home of the test's own, and no cloud keys."""
    for k in _LEAKY_ENV:
        monkeypatch.delenv(k, raising=False)
    env = {
        "BROKER_CONFIG": str(tmp_path / "config" / "config.toml"),
        "BROKER_STATE_DIR": str(tmp_path / "state"),
        "BROKER_ENV_FILE": str(tmp_path / "no.env"),
        "BIFROST_HOME": str(tmp_path / "bifrost"),
        "SSH_KEY_PATH": str(tmp_path / "no-key"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {**os.environ, "PYTHONPATH": _pythonpath()}


def _pythonpath() -> str:
    """This tree first, so subprocesses run the code under test (as if it were installed)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _invoke_broker(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from broker.cli import app

    r = CliRunner().invoke(app, args, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def _parse_only(prog: str, args: list[str]) -> None:
    """Parse a command line with the CLI's own parser, running none of its commands."""
    if prog == "bifrost":
        import bifrost.cli

        parse = getattr(bifrost.cli, "_parse", None)
        if parse is not None:  # the argparse CLI: parsing has no side effects
            try:
                parse(list(args))
            except SystemExit as e:
                raise AssertionError(
                    f"bifrost {shlex.join(args)}: rejected (exit {e.code})"
                ) from None
            return
        app = bifrost.cli.app  # type: ignore[attr-defined]
    else:
        import broker.cli

        app = broker.cli.app
    import typer.main

    cmd = typer.main.get_command(app)

    def stub(c: object) -> None:
        c.callback = lambda **_: None  # type: ignore[attr-defined]
        for sub in (getattr(c, "commands", None) or {}).values():
            stub(sub)

    stub(cmd)
    try:
        cmd.main(args=list(args), prog_name=prog, standalone_mode=False)
    except Exception as e:
        raise AssertionError(f"{prog} {shlex.join(args)}: {e}") from None


def _ruff() -> Path | None:
    exe = Path(sys.executable).parent / "ruff"
    return exe if exe.exists() else (Path(p) if (p := shutil.which("ruff")) else None)


def _undefined_names(source: str) -> str:
    """ruff's F821 (undefined name) findings for a snippet, '' when clean or ruff is absent."""
    ruff = _ruff()
    if ruff is None:
        return ""
    r = subprocess.run(
        [str(ruff), "check", "--isolated", "--select", "F821", "--output-format", "concise",
         "--stdin-filename", "block.py", "-"],
        input=source, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    return "" if r.returncode == 0 else r.stdout.strip()


@functools.cache
def _help_results() -> dict[tuple[str, ...], tuple[int, str]]:
    """`--help` of every experiment script the docs name, run in parallel (they import torch)."""
    scripts = sorted({tuple(c.argv) for c in CHECKS if c.kind == "script" and c.action == "help"})
    env = {**os.environ, "PYTHONPATH": _pythonpath()}

    def run(script: tuple[str, ...]) -> tuple[int, str]:
        r = subprocess.run(
            [sys.executable, *script, "--help"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        return r.returncode, r.stdout + r.stderr

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(scripts, pool.map(run, scripts), strict=True))


# --- the checks ------------------------------------------------------------------------------


def test_every_block_has_a_rule() -> None:
    """No doc block or command is unclassified (a new one needs a rule here or a marker)."""
    bad = [f"{c.id}: {c.reason}" for c in CHECKS if c.action == "fail"]
    assert not bad, "\n".join(bad)
    assert len({c.block.path for c in CHECKS}) >= 5  # the extraction found the docs


def test_bifrost_pull_job_examples_show_the_outputs() -> None:
    """A `bifrost pull --job` example shows the `run -o PATH` that declares what it pulls: a
    job's results are its dir (log, exit code) plus the outputs declared at `run`."""
    bad = []
    for c in CHECKS:
        if c.kind == "bifrost" and c.argv[:1] == ["pull"] and "--job" in c.argv:
            runs = [r for r in CHECKS if r.block is c.block and r.argv[:1] == ["run"]]
            if not any({"-o", "--output"} & set(r.argv) for r in runs):
                bad.append(c.id)
    assert not bad, bad


def test_broker_md_all_take_json() -> None:
    """docs/broker.md says of the commands in the block before it "All take `--json`": each
    command there accepts `--json`."""
    path = ROOT / "docs" / "broker.md"
    text = path.read_text()
    at = text.find("All take `--json`")
    assert at >= 0, "docs/broker.md no longer says the instance commands all take --json"
    claim_line = text[:at].count("\n") + 1
    block = [b for b in doc_blocks(path) if b.line < claim_line][-1]
    commands = [c for c in classify_block(block) if c.kind == "broker" and c.action != "skip"]
    assert len(commands) >= 5, [c.text for c in commands]
    for c in commands:
        _parse_only("broker", [*c.argv, "--json"])


def test_pytest_plugin_fixtures_outside_this_repo(tmp_path: Path) -> None:
    """`pytest_plugins = ["broker.testing.pytest_plugin"]` gives another project the fixtures."""
    (tmp_path / "test_theirs.py").write_text(
        textwrap.dedent(
            """
            import os

            pytest_plugins = ["broker.testing.pytest_plugin"]

            def test_fixtures(runpod_sim, bifrost_home):
                assert runpod_sim.url.startswith("http://127.0.0.1:")
                assert os.environ["BIFROST_HOME"] == str(bifrost_home)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_theirs.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_rules_themselves(tmp_path: Path) -> None:
    """Markers override the rules; cloud, instance and host lines are parsed, not run; unknown
    commands and block kinds are reported, never passed over."""
    doc = tmp_path / "x.md"
    doc.write_text(
        textwrap.dedent(
            """\
            ```bash
            broker search 'gpus>=1'   # offline
            broker search --provider vast --json
            broker create 'gpu~A100' --ttl 3h; broker instances ssh broker-3f2a
            broker create --provider local -y
            RUNPOD_API_URL=http://127.0.0.1:8765 broker search --provider runpod
            uv run --extra experiments python experiments/x.py --model a \\
                --out b
            make docs
            ```

            <!-- doc-test: skip: needs a GPU -->
            ```bash
            broker search
            ```

            ```python
            with GPUClient().create("gpus=1") as inst: ...
            ```

            ```ini
            a = 1
            ```
            """
        )
    )
    checks = [c for b in doc_blocks(doc) for c in classify_block(b)]
    got = [(c.action, c.kind, c.text, c.argv) for c in checks]
    assert got[0] == ("run", "broker", "broker search 'gpus>=1'", ["search", "gpus>=1"])
    assert got[1][:2] == ("parse", "broker")
    assert [g[:2] for g in got[2:4]] == [("parse", "broker"), ("parse", "broker")]
    assert got[3][3] == ["instances", "ssh", "broker-3f2a"]
    assert got[4][:2] == ("run", "broker")
    assert got[5][:2] == ("run", "sim-client")
    assert got[6][:2] == ("help", "script") and got[6][3] == ["experiments/x.py"]
    assert got[7][:2] == ("fail", "none")
    assert got[8][:3] == ("skip", "broker", "broker search")
    assert checks[8].reason == "needs a GPU"
    assert got[9][:2] == ("parse", "python")
    assert got[10][:2] == ("fail", "none")


def test_yaml_blocks_load_as_task_or_sweep_files(tmp_path: Path) -> None:
    from broker.errors import ConfigError

    doc = tmp_path / "launch.md"
    doc.write_text(
        "```yaml\nname: t\nrun: python train.py\n```\n\n"
        "```yaml\nname: s\ntask:\n  name: t\n  run: echo {lr}\nmatrix:\n  lr: [1, 2]\n```\n\n"
        "```yaml\nname: t\nrnu: python train.py\n```\n"
    )
    good_task, good_sweep, bad = (c for b in doc_blocks(doc) for c in classify_block(b))
    assert good_task.kind == good_sweep.kind == bad.kind == "yaml"
    _check_yaml(good_task, {}, tmp_path)
    _check_yaml(good_sweep, {}, tmp_path)
    with pytest.raises(ConfigError):
        _check_yaml(bad, {}, tmp_path)


RUNNABLE = [c for c in CHECKS if c.action != "skip"]


def test_blocks_left_out_say_why() -> None:
    """Blocks that are not code (prose, diagrams) or must not run here (installs, your shell's
    startup files) are left out of test_doc_block, each with its reason."""
    left_out = [c for c in CHECKS if c.action == "skip"]
    assert all(c.reason.strip() for c in left_out), [c.id for c in left_out if not c.reason]
    assert len(RUNNABLE) > len(left_out)


@pytest.mark.parametrize("check", RUNNABLE, ids=[c.id for c in RUNNABLE])
def test_doc_block(check: Check, offline_env: dict[str, str], tmp_path: Path) -> None:
    if check.action == "fail":
        pytest.fail(f"{check.block.where}: {check.reason}")
    {
        "broker": _check_broker,
        "bifrost": _check_bifrost,
        "script": _check_script,
        "python": _check_python,
        "pytest": _check_pytest,
        "sim": _check_sim,
        "sim-client": _check_sim_client,
        "transcript": _check_transcript,
        "toml": _check_toml,
        "query": _check_query,
        "yaml": _check_yaml,
    }[check.kind](check, offline_env, tmp_path)


def _check_broker(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    if check.action == "parse":
        _parse_only("broker", check.argv)
        return
    if check.action == "help":
        check.argv.append("--help")
    code, out, err = _invoke_broker(check.argv)
    assert code == 0, f"{check.text}: exit {code}\n{out}{err}"


def _check_bifrost(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    assert check.action == "parse", check.action
    _parse_only("bifrost", check.argv)


def _check_script(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    code, output = _help_results()[tuple(check.argv)]
    assert "Traceback" not in output, output
    if code != 0:
        # Without the `experiments` extra a script must say how to install it, not crash.
        assert "--extra experiments" in output, output
        return
    assert "usage:" in output.lower(), output


def _check_python(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    source = check.block.body
    compile(source, check.block.where, "exec")
    assert not (undefined := _undefined_names(source)), f"{check.block.where}:\n{undefined}"
    if check.action != "run":
        return
    r = subprocess.run(
        [sys.executable, "-c", source],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, f"{check.block.where}:\n{r.stdout}{r.stderr}"


def _check_pytest(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    """The example is a test module of someone else's project: it must pass there, with only
    the installed packages (no conftest.py of this repo)."""
    source = check.block.body
    assert not (undefined := _undefined_names(source)), f"{check.block.where}:\n{undefined}"
    if check.action != "run":
        return
    assert Path("/usr/sbin/sshd").exists(), "needs OpenSSH's sshd (tests/conftest.py installs it)"
    project = tmp_path / "their_project"
    project.mkdir()
    (project / "test_example.py").write_text(source)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=project, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, f"{check.block.where}:\n{r.stdout}{r.stderr}"


def _check_sim(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    """The simulator's command-line block: start it, then run the block's other lines at it."""
    others = [c for c in CHECKS if c.block is check.block and c.kind == "sim-client"]
    args = [a if a != "8765" else "0" for a in check.argv[2:]]  # any free port
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.testing.runpod_sim", *args],
        cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        said: list[str] = []
        m = None
        while m is None and len(said) < 50 and (line := proc.stdout.readline()):
            said.append(line)  # a warning may come before the URL line
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, f"simulator said {''.join(said)!r}"
        for other in others:
            line_env, words = _strip_env(_words(other.text))
            line_env = {k: v.replace(":8765", f":{m.group(1)}") for k, v in line_env.items()}
            code, out, err = _invoke_broker(words[1:], env=line_env)
            assert code == 0, f"{other.text}: exit {code}\n{out}{err}"
            assert "ok runpod" in err, err
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _check_sim_client(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    """A `RUNPOD_API_URL=... broker ...` line runs in the check of its block's simulator line."""
    assert any(c.block is check.block and c.kind == "sim" for c in CHECKS), (
        f"{check.id}: no `python -m broker.testing.runpod_sim` line in its block to run it at"
    )


def _check_transcript(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    lines = check.block.body.rstrip("\n").splitlines()
    assert lines[0].startswith("$ broker "), lines[0]
    _, out, err = _invoke_broker(_words(lines[0][2:])[1:])
    expected = "\n".join(lines[1:])
    assert expected in (out + err).rstrip("\n"), f"expected:\n{expected}\ngot:\n{out}{err}"


def _check_toml(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    from broker.config import load_settings

    cfg = Path(env["BROKER_CONFIG"])
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(check.block.body)
    load_settings()


def _check_query(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    from broker.query import parse

    for text in check.block.body.strip().splitlines():
        parse(text)


def _check_yaml(check: Check, env: dict[str, str], tmp_path: Path) -> None:
    """A task file (or a sweep file: one with a `task` or `matrix`) loads without an error."""
    import yaml

    from broker.launch.sweep import load_sweep
    from broker.launch.task import load_task

    path = tmp_path / "doc.yaml"
    path.write_text(check.block.body)
    data = yaml.safe_load(check.block.body)
    if isinstance(data, dict) and ({"task", "matrix"} & set(data)):
        load_sweep(path)
    else:
        load_task(path)
