"""The code examples of ``docs/guides/`` run as tests, so the guides cannot drift from the code.

Each guide's ```` ```python ```` blocks run in order, in one namespace (as a reader would run
them one after the other), in a fresh working directory with ``ERLLAMA_CACHE_DIR``
pointing into a temporary directory (and with it the default tmpfs tier, whose name
derives from the cache directory), so a run neither reads nor changes the user's cache.
The default model is linked into that cache, not assembled again.

A block that cannot run here says so in the guide, on the line right before it:
``<!-- not run: <reason> -->``. Such a block is not silently dropped: it is reported as a
skipped test naming the guide, the line and the reason.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import erllama

GUIDES = Path(__file__).resolve().parent.parent / "docs" / "guides"
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced python block of a guide."""

    guide: str
    line: int  # 1-based line of the first code line
    code: str
    not_run: str | None  # the reason given by a ``<!-- not run: ... -->`` marker

    @property
    def where(self) -> str:
        return f"docs/guides/{self.guide}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The python blocks of a markdown file, with their not-run markers."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if m["lang"] == "python":
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NOT_RUN.search(prev)
            if "<!--" in prev and marker is None:
                raise AssertionError(f"{path.name}:{i}: an HTML comment before a block must be "
                                     f"'<!-- not run: <reason> -->', got {prev!r}")
            reason = marker["reason"] if marker else None
            if marker is not None and not reason:
                raise AssertionError(f"{path.name}:{i}: a not-run marker must give its reason")
            out.append(Block(path.name, i + 2, "\n".join(lines[i + 1:end]) + "\n", reason))
        i = end + 1
    return out


ALL = {p.name: blocks(p) for p in sorted(GUIDES.glob("*.md"))}
SKIPPED = [b for bs in ALL.values() for b in bs if b.not_run is not None]


@pytest.fixture
def sandbox(tmp_path, monkeypatch, gemma_path):
    """A private cache (``$ERLLAMA_CACHE_DIR``, the default tmpfs tier) and working directory,
    with the default model linked in; stops whatever the guide left running."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    for src in (gemma_path, gemma_path.with_name(gemma_path.name + ".verified")):
        (cache / "models" / src.name).symlink_to(src)
    monkeypatch.setenv("ERLLAMA_CACHE_DIR", str(cache))  # the default ram_file_dir derives from it
    # one decode thread unless the example says otherwise: on a shared machine llama.cpp's
    # threads wait for each other at every step (docs/guides/configuration.md)
    load_model = erllama.load_model
    monkeypatch.setattr(erllama, "load_model", lambda path, **options: load_model(path, **{"n_threads": 1, **options}))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    with contextlib.suppress(Exception):
        erllama.stop()


@pytest.mark.gemma
@pytest.mark.parametrize("guide", sorted(ALL))
def test_the_examples_of_a_guide_run(guide, sandbox):
    namespace: dict[str, object] = {"__name__": f"docs_{guide.removesuffix('.md')}"}
    ran = 0
    for block in ALL[guide]:
        if block.not_run is not None:
            continue
        # padded so that a traceback names the guide's own line
        code = compile("\n" * (block.line - 1) + block.code, str(GUIDES / guide), "exec")
        t0 = time.monotonic()
        try:
            exec(code, namespace)
        except Exception as exc:
            raise AssertionError(f"the example at {block.where} failed: {exc!r}") from exc
        print(f"TIMING {block.where}: {time.monotonic() - t0:.1f} s")
        ran += 1
    assert ran, f"{guide} has no example that runs"
    assert not _running(), f"{guide} leaves the application running: its last example should stop it"


def test_examples_marked_not_run_are_listed():
    if SKIPPED:
        pytest.skip("; ".join(f"{b.where} not run: {b.not_run}" for b in SKIPPED))


def test_not_run_markers_are_read_and_checked(tmp_path):
    md = tmp_path / "g.md"
    md.write_text("text\n\n<!-- not run: needs a GPU -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
                  "```\nnot python\n```\n")
    assert blocks(md) == [Block("g.md", 5, "x = 1\n", "needs a GPU"), Block("g.md", 9, "y = 2\n", None)]
    md.write_text("<!-- not run: -->\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="reason"):
        blocks(md)
    md.write_text("<!-- skip this -->\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="not run"):
        blocks(md)


def test_every_guide_has_examples_that_are_found():
    assert sorted(ALL) == sorted(p.name for p in GUIDES.glob("*.md"))
    assert all(ALL.values()), {g: len(b) for g, b in ALL.items()}


def _running() -> bool:
    from erllama import app, errors

    try:
        app.current()
    except errors.ErllamaError:
        return False
    return True
