"""The README's commands, run as a reader runs them, against the README's own `make serve`.

Every fenced block is read: ``sh``/``bash``/``shell`` blocks are shell commands, ``console`` blocks are
``$ command`` lines each followed by the output it shows, ``python`` blocks are scripts, and a ``text`` block
right after a shell block is the output the block's last command shows. A block added later (a new section)
is run the same way; a command that cannot run here must be named in :data:`NOT_RUN` with the reason, and
one whose program or library is not installed here skips saying so (:func:`why_not_here`).

How the reader's machine is stood in for, all of it explicit:

- the working directory is a scratch folder whose entries link to the checkout's (``Makefile``, ``.venv``,
  ``deploy/``, ...), so what the commands write (``samples/``, ``models/``) lands there, not in the checkout;
  ``models/`` holds the default digits model of the session's training fixture (no training here);
- ``make serve`` runs in the background for the whole README, as the reader leaves it running, on free ports:
  :meth:`Reader.substituted` maps the README's ports (8500, 8000, 8501) to them in every command and script;
- the files a reader brings (``my_model.onnx``, ``sample-photos/``) are made by :func:`readers_files`;
- :data:`ADJUSTED` lists the commands run with something added, and why, and :data:`DEFAULT_FLAGS` the
  defaults written out so that their port can be replaced;
- the commands run in the README's order and share the directory, as in a reader's terminal (the samples
  that one block writes are classified by the next).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from convserve_bench.processes import ServerExited, free_port, wait_until_ready
from PIL import Image

from tests.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_LANGUAGES = {"sh", "bash", "shell"}
COMMAND_TIMEOUT_S = 120

NOT_RUN: dict[str, str] = {
    "make test": "the test suite itself, of which this test is a part",
    "docker compose up": "builds and runs images: needs a Docker engine and the network to pull the base "
                         "images; tests/test_compose.py checks the compose files",
    "docker compose -f docker-compose.yml -f docker-compose.cpu.yml up": "as docker compose up",
    "docker compose run --rm client": "as docker compose up",
    "kubectl apply -k deploy/kubernetes/overlays/cpu": "needs a cluster; tests/deploy renders, checks and runs "
                                                       "(as a process) the same overlays",
    "kubectl apply -k deploy/kserve": "needs a cluster with KServe; tests/deploy checks the same objects",
    ".venv/bin/convserve-train --data-dir photos/ --height 64 --width 64 --epochs 20 --min-test-accuracy 0.8":
        "trains with TensorFlow on the reader's photos for minutes; tests/training/test_cli.py trains on folders "
        "it makes, with the same flags",
}
"""Commands not run here (as the README writes them, comments left out), and why."""

ADJUSTED: dict[str, tuple[str, str]] = {
    ".venv/bin/perf_analyzer -m digits -i grpc -u 127.0.0.1:8500 --concurrency-range 8": (
        " -p 1000 --max-trials 3 -s 1000",
        "three one-second windows that always count as stable, instead of 5-second windows until three agree: a "
        "loaded test machine would take minutes or fail the stability check (tests/server/test_triton.py too)"),
}
"""Commands run with flags appended: command -> (what is appended, why)."""

DEFAULT_FLAGS: dict[str, tuple[str, str]] = {
    ".venv/bin/convserve-classify": ("--server", "localhost:8500"),
}
"""A program's default that the README's commands rely on, written out (when the command leaves it out) so that
its port can be replaced: program -> (flag, its default)."""


@dataclass
class Command:
    """One shell command of the README and the output it shows, if it shows any."""

    text: str
    line: int
    shown_output: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The command as :data:`NOT_RUN` and :data:`ADJUSTED` name it: no trailing comment, single spaces."""
        return " ".join(strip_comment(self.text).split())


@dataclass
class Block:
    """A fenced code block of the README."""

    language: str
    line: int
    lines: list[str]
    commands: list[Command] = field(default_factory=list)


def strip_comment(command: str) -> str:
    """The command without a trailing ``# ...`` comment (a ``#`` inside quotes stays)."""
    quote = None
    for index, character in enumerate(command):
        if character in "'\"" and quote in (None, character):
            quote = None if quote else character
        elif character == "#" and quote is None and (index == 0 or command[index - 1].isspace()):
            return command[:index].rstrip()
    return command.rstrip()


def read_blocks(markdown: str) -> list[Block]:
    """The fenced blocks, with their shell commands and the output each shows."""
    blocks: list[Block] = []
    current: Block | None = None
    for number, line in enumerate(markdown.splitlines(), start=1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and current is None:
            current = Block(fence.group(1), number, [])
        elif fence or line.strip() == "```":
            if current is not None:
                blocks.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    for index, block in enumerate(blocks):
        if block.language in SHELL_LANGUAGES:
            block.commands = list(shell_commands(block))
        elif block.language == "console":
            block.commands = list(console_commands(block))
        elif block.language == "text" and index and blocks[index - 1].language in SHELL_LANGUAGES:
            blocks[index - 1].commands[-1].shown_output = block.lines
    return blocks


def shell_commands(block: Block) -> Iterator[Command]:
    """Each command of a shell block, continuation lines joined; comment lines skipped."""
    pending, start = "", block.line
    for offset, line in enumerate(block.lines, start=1):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending:
            start = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield Command(pending + line.strip(), start)
        pending = ""


def console_commands(block: Block) -> Iterator[Command]:
    """Each ``$ command`` line of a console block, with the lines up to the next one as its output."""
    command: Command | None = None
    for offset, line in enumerate(block.lines, start=1):
        if line.startswith("$ "):
            if command is not None:
                yield command
            command = Command(line[2:].strip(), block.line + offset)
        elif command is not None:
            command.shown_output.append(line)
    if command is not None:
        yield command


def output_drift(shown: list[str], actual: str, within_lines: bool = False) -> str | None:
    """Why ``actual`` does not show the ``shown`` lines in their order, or None if it does.

    Numbers may differ (timings, counts), and ``…`` or ``...`` stands for any text. ``within_lines``: a shown
    line may be part of an actual one (a log line's message after its timestamp).
    """
    lines = [line.strip() for line in actual.splitlines()]
    position = 0
    for wanted in (line.strip() for line in shown if line.strip()):
        pattern = re.escape(wanted)
        pattern = re.sub(r"\d+(?:\\\.\d+)?", r"[-+\\d.e]+", pattern)
        pattern = pattern.replace("…", ".*").replace(r"\.\.\.", ".*")
        match = re.search if within_lines else re.fullmatch
        found = next((i for i in range(position, len(lines)) if match(pattern, lines[i])), None)
        if found is None:
            return f"the README shows {wanted!r}, which the output no longer has (after line {position})"
        position = found + 1
    return None


# --- the tests of the reading itself ------------------------------------------------------------

def test_blocks_commands_and_shown_output_are_read():
    markdown = "\n".join([
        "```sh", "# a comment", "make serve     # trains first", "a --b \\", "   --c  # x", "```",
        "```text", "Throughput: 12.5 infer/sec", "```",
        "```console", "$ echo 'a # b'", "a # b", "$ true", "```",
    ])
    shell, text, console = read_blocks(markdown)
    assert [c.key for c in shell.commands] == ["make serve", "a --b --c"]
    assert shell.commands[1].shown_output == ["Throughput: 12.5 infer/sec"] and text.language == "text"
    assert [(c.key, c.shown_output) for c in console.commands] == [("echo 'a # b'", ["a # b"]), ("true", [])]


def test_output_drift_allows_other_numbers_and_ellipses_but_not_other_words():
    actual = "Request concurrency: 8\n  Client:\n    Throughput: 1401.7 infer/sec\n  Server:\n"
    assert output_drift(["Client:", "Throughput: 1492.58 infer/sec"], actual) is None
    assert output_drift(["Throughput: … infer/sec"], actual) is None
    assert "Throughput: 1 images/sec" in output_drift(["Throughput: 1 images/sec"], actual)
    assert output_drift(["Server:", "Client:"], actual) is not None  # order counts


def test_every_command_named_not_run_or_adjusted_is_still_in_the_readme():
    keys = {c.key for block in read_blocks(README.read_text()) for c in block.commands}
    assert set(NOT_RUN) - keys == set(), "NOT_RUN names commands the README no longer has"
    assert set(ADJUSTED) - keys == set(), "ADJUSTED names commands the README no longer has"


# --- the README, run ---------------------------------------------------------------------------------

@dataclass
class Reader:
    """The scratch working directory, the ports the README's are mapped to, and the server's log."""

    directory: Path
    ports: dict[str, int]
    server_log: Path

    def substituted(self, text: str) -> str:
        """``text`` with the README's ports replaced by the test's (defaults that imply them written out first)."""
        program = text.split()[0] if text.split() else ""
        if program in DEFAULT_FLAGS and DEFAULT_FLAGS[program][0] not in text.split():
            text = f"{text} {' '.join(DEFAULT_FLAGS[program])}"
        for readme_port, port in self.ports.items():
            text = re.sub(rf"\b(localhost|127\.0\.0\.1):{readme_port}\b", rf"127.0.0.1:{port}", text)
        return text


def readers_files(directory: Path) -> None:
    """What the README assumes the reader has: a foreign ONNX classifier of three classes and sample photos."""
    model = tiny_model(labels=("cat", "dog", "rabbit"), height=16, width=16)
    del model.metadata_props[:]  # as another exporter writes it: no card
    onnx.save(model, directory / "my_model.onnx")
    photos = directory / "sample-photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):
        Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)).save(photos / f"photo{index}.png")


@pytest.fixture(scope="module")
def reader(default_training, tmp_path_factory) -> Iterator[Reader]:
    """The scratch directory with the default model, and the README's own `make serve` running there."""
    directory = tmp_path_factory.mktemp("reader")
    for entry in ROOT.iterdir():
        if entry.name not in {"models", "samples", ".git"}:
            (directory / entry.name).symlink_to(entry)
    model = directory / "models" / "digits" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    shutil.copy(default_training.model_path, model)
    readers_files(directory)
    ports = {"8500": free_port(), "8501": free_port(), "8000": free_port()}
    reader = Reader(directory, ports, directory / "make-serve.log")
    # make serve's own flags set the host and the gRPC port (PORT); the metrics and HTTP ports are left to the
    # server's variables. -o: the test does not reinstall the venv even if a pyproject.toml is newer than it.
    stamps = [arg for build in ("cpu", "gpu") for arg in ("-o", f".venv/.installed-serve-{build}")]
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CONVSERVE_")}
    environment |= {"CONVSERVE_METRICS_PORT": str(ports["8501"]), "CONVSERVE_HTTP_PORT": str(ports["8000"]),
                    "PYTHONUNBUFFERED": "1"}
    with open(reader.server_log, "wb") as log:
        process = subprocess.Popen(["make", *stamps, "serve", f"PORT={ports['8500']}"], cwd=directory,
                                   env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(f"127.0.0.1:{ports['8500']}", process, 120)
    except ServerExited as exc:
        pytest.fail(f"make serve exited: {reader.server_log.read_text()[-3000:]}\n{exc.one_line()}")
    yield reader
    os.killpg(process.pid, signal.SIGTERM)  # make and the server it started
    process.wait(timeout=60)


def readme_commands() -> list[tuple[Block, Command | None]]:
    """Every command of the README (a Python block as one, with None), in the README's order."""
    steps: list[tuple[Block, Command | None]] = []
    for block in read_blocks(README.read_text()):
        if block.language == "python":
            steps.append((block, None))
        steps += [(block, command) for command in block.commands]
    return steps


def why_not_here(command: Command, directory: Path) -> str | None:
    """Why a command cannot run on this machine (its program or a library missing), or None if it can."""
    program = next(word for word in command.key.split() if "=" not in word)
    if program in {"export", "mkdir", "mv", "cd"}:
        return None
    found = (directory / program).exists() if "/" in program else shutil.which(program) is not None
    if not found:
        return f"{program} is not installed here"
    if program.endswith("perf_analyzer"):
        linked = subprocess.run(["ldd", str(directory / program)], capture_output=True, text=True).stdout
        missing = [line.split()[0] for line in linked.splitlines() if "not found" in line and "cudart" not in line]
        if missing:
            return f"perf_analyzer cannot load {', '.join(missing)} (Debian's libb64-0d: make perf-deps, as root)"
    return None


def step_id(step: Block | Command | None) -> str:
    """A test id: the block's language, then the command's line (a Python block: its own line)."""
    if isinstance(step, Block):
        return f"{step.language}-line{step.line}" if step.language == "python" else step.language
    return f"line{step.line}" if step is not None else "script"


@pytest.mark.parametrize("block, command", readme_commands(), ids=step_id)
def test_the_readmes_commands_run_and_show_what_it_says(reader, block, command):
    if command is None:
        run_python_block(reader, block)
        return
    if command.key in NOT_RUN:
        pytest.skip(f"not run here: {NOT_RUN[command.key]}")
    if command.key == "make serve":
        check_make_serve(reader)
        return
    reason = why_not_here(command, reader.directory)
    if reason:
        pytest.skip(reason)
    exports = [reader.substituted(c.text) for c in block.commands[:block.commands.index(command)]
               if c.key.startswith("export ")]
    text = reader.substituted(command.text) + ADJUSTED.get(command.key, ("", ""))[0]
    done = subprocess.run(["bash", "-c", "\n".join(["set -e", *exports, text])], cwd=reader.directory,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, (f"README line {command.line}: `{command.text}` exited {done.returncode}:\n"
                                  f"{(done.stderr or done.stdout)[-3000:]}")
    if command.shown_output:
        drift = output_drift(command.shown_output, done.stdout)
        assert drift is None, f"README line {command.line}: `{command.text}`: {drift}\n{done.stdout[-3000:]}"


def run_python_block(reader: Reader, block: Block) -> None:
    """A Python block as a script, run by the venv's Python in the reader's directory."""
    script = reader.directory / f"readme-line{block.line}.py"
    script.write_text(reader.substituted("\n".join(block.lines)))
    done = subprocess.run([sys.executable, str(script)], cwd=reader.directory, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, f"README line {block.line}: the script failed:\n{done.stderr[-3000:]}"


def check_make_serve(reader: Reader) -> None:
    """`make serve` (started by the fixture) logs the lines the quick start quotes and listens on loopback only."""
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    quoted = [" ".join(phrase.split()) for phrase in re.findall(r"`([^`]*ready[^`]*)`", quick_start)]
    assert len(quoted) >= 2, quoted
    deadline = time.monotonic() + 60
    while "ready: serving" not in reader.server_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # written by another process, which was ready already: polled until a deadline
    log = reader.server_log.read_text()
    for phrase in quoted:
        drift = output_drift([phrase], log, within_lines=True)
        assert drift is None, f"{drift}\n{log[-3000:]}"
    assert "ONNX Runtime: " in log and f"listening on 127.0.0.1:{reader.ports['8500']}" in log
    assert "no --auth-token and no TLS" not in log
