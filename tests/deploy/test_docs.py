"""The documentation: README.md and the pages in docs/, and the site MkDocs builds from them.

Every code block is one of:
- ```python: run as written, in a fresh `python` process (this venv's), one per block;
- ```sh: run as written by `bash -euo pipefail`;
- ```text: output shown, not code;
- any block right after `<!-- not run: REASON -->`: not run, for the reason given (it
  installs, needs podman, docker, a cluster, or runs until stopped);
- any block right after `<!-- run by tests/PATH -->`: that test module runs it (it must
  exist and name the page).
A block of another kind, or an indented (unfenced) code block without a marker, fails, and
so does a fence that does not start at column 0 (inside a list item): Python-Markdown,
which MkDocs uses, renders it as inline text.

The blocks of one page run in order in one temporary directory (files a block writes are
there for the next; Python names are not), beside a `.venv` link to this venv and a copy
of docs/*.py. A page whose blocks connect to 127.0.0.1:50051 says a server runs there
(`gradserve serve --host 127.0.0.1 --port 50051`): the test runs that command for them,
once the port is free.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import REPO
from support.server_process import ServerProcess, clean_env

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
RUN = {"python", "sh"}
MARKER = re.compile(r"<!-- (not run: .+?|run by (tests/\S+\.py)) -->\s*$")
FENCE = re.compile(r"^( *)(```+)(\S*)\s*$")
SERVED = "127.0.0.1:50051"
SNIPPET_SECONDS = 240


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the block's first line (its fence)
    kind: str  # python, sh, text, or "indented"
    code: str
    marker: str | None  # "not run: ..." / "run by tests/..." / None
    indent: int = 0  # of a fenced block's fence

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The page's code blocks: fenced ones (any indentation, as inside a list item) and
    indented ones (4 spaces after a blank line, outside a fence)."""
    lines = page.read_text(encoding="utf-8").split("\n")
    found, marker, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            indent, ticks, kind = fence.groups()
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != ticks:
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            found.append(Block(page, start + 1, kind or "untagged", "\n".join(body) + "\n",
                               marker, len(indent)))
            marker = None
        elif line.startswith("    ") and i > 0 and not lines[i - 1].strip():
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            found.append(Block(page, start + 1, "indented", "\n".join(body).strip() + "\n",
                               marker))
            marker = None
            continue
        elif MARKER.search(line):
            marker = MARKER.search(line).group(1)
        elif line.strip():
            marker = None
        i += 1
    return found


def test_every_block_is_run_or_says_why_not():
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if block.indent:
                problems.append(f"{block.where()}: an indented fence (in a list item) is "
                                "not a code block to MkDocs' Markdown: start it at column 0")
            if block.marker and block.marker.startswith("run by "):
                test = REPO / block.marker.removeprefix("run by ")
                named = block.page.relative_to(REPO).as_posix()
                if not test.is_file() or named not in test.read_text(encoding="utf-8"):
                    problems.append(f"{block.where()}: {block.marker}, but that file does "
                                    f"not exist or does not name {named}")
            elif block.marker is None and block.kind not in RUN | {"text"}:
                problems.append(f"{block.where()}: a {block.kind} block: fence it as python, "
                                "sh or text, or put <!-- not run: REASON --> before it")
    assert not problems, "\n".join(problems)


def to_run(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.marker is None and b.kind in RUN]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def served():
    """`gradserve serve --host 127.0.0.1 --port 50051`, started at the first page that
    needs it and stopped at the end of the module."""
    servers = []

    def start():
        if not servers:
            deadline = time.monotonic() + 120
            while not port_is_free(50051):
                assert time.monotonic() < deadline, "port 50051 stayed in use for 2 minutes"
                time.sleep(1)
            servers.append(ServerProcess("--host", "127.0.0.1", "--port", "50051"))
            assert servers[0].wait_serving() == SERVED
    yield start
    for server in servers:
        server.stop()


def workdir(tmp_path: Path) -> Path:
    """The page's directory: `.venv` is this venv, `docs/` holds docs/*.py."""
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (tmp_path / "docs").mkdir()
    for script in DOCS.glob("*.py"):
        shutil.copy(script, tmp_path / "docs")
    return tmp_path


def run(block: Block, cwd: Path, number: int):
    env = clean_env(MPLBACKEND="Agg")
    del env["GRADSERVE_PROCESSES"]
    if block.kind == "python":
        script = cwd / f"snippet_{number}.py"
        script.write_text(block.code, encoding="utf-8")
        command = [sys.executable, script.name]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SNIPPET_SECONDS)
    assert done.returncode == 0, (f"{block.where()} ({block.kind}) exited {done.returncode}:"
                                  f"\n{block.code}\n--- stdout\n{done.stdout[-3000:]}"
                                  f"\n--- stderr\n{done.stderr[-3000:]}")


@pytest.mark.parametrize("page", [p for p in PAGES if to_run(p)],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_snippets_run_as_written(page, tmp_path, served):
    cwd = workdir(tmp_path)
    for number, block in enumerate(to_run(page)):
        if SERVED in block.code:
            served()
        run(block, cwd, number)


def test_mkdocs_builds_strict(tmp_path):
    """Warnings are errors: a link to a missing page or anchor, a page left out of the
    nav, a file the nav names that does not exist."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_links_resolve():
    """README.md is not part of the site, so MkDocs does not check its links: each
    relative link names an existing file."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [link for link in links if "://" not in link and not (REPO / link).exists()]
    assert links and not missing, missing


def test_readme_is_a_short_map():
    """Under 200 lines, the two commands as CI runs them, a link to every page."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert ("    python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
            ".venv/bin/python -m pytest\n") in text
    assert "    python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/gradserve demo\n" \
        in text
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", text))
    assert {p.name for p in DOCS.glob("*.md")} - {"index.md"} <= linked
