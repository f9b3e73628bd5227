"""The README and docs/ as a reader meets them: every relative link and #anchor resolves, and every
command they show uses only flags its tool has.

Links: each `[text](target)` and `![alt](target)` outside code, in README.md and docs/*.md, names
a file or folder that exists, and its `#anchor` a heading of the target page by GitHub's rule
(`slug`). http(s) and mailto links are not fetched.

Commands: each line of a code block (continuation lines joined), and each inline code span, that
runs `python process_segmentation.py`, a script of bench/ or tests/, `python3 -m sam3_pipeline.X`
or `sky ...` (any interpreter path in front, a `$ ` prompt, several commands joined by `&&`, `|`
or `;`) has each of its `--flags` and `-f` short flags, and each `--flag` its comment names, in
that tool's `--help`: the Python ones run with this interpreter, SkyPilot's subcommand by
subcommand with the `sky` of the SkyPilot venv ($SKYPILOT_PYTHON's folder, else .venv-sky, as
for the other SkyPilot tests, which fail without it).

Each problem names its file, line and flag.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPT, PROGRESS, SKY = "python process_segmentation.py", "python -m sam3_pipeline.progress", "sky"
# A Python tool is named by what follows the interpreter: `process_segmentation.py`, `bench/x.py`, `-m sam3_pipeline.x`.
TOOL_AT_START = re.compile(
    r"(?:\S*/)?(?:python3?\s+(?P<python>process_segmentation\.py|(?:bench|tests)/\w+\.py|-m\s+sam3_pipeline\.\w+)"
    r"|(?P<sky>sky))(?:\s|$)"
)
SEPARATORS = {"&&", "||", "|", ";", "&"}
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*|-[A-Za-z])(?![\w-])")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
FENCE = re.compile(r"^\s*(```|~~~)")


# ---------------------------------------------------------------------------------------------
# Reading a page
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Line:
    page: Path
    number: int  # 1-based
    text: str
    code: bool  # inside a fenced code block (the fences themselves are not code)

    def where(self) -> str:
        try:
            name = self.page.relative_to(REPO)
        except ValueError:
            name = self.page
        return f"{name}:{self.number}"


def lines_of(page: Path) -> list[Line]:
    lines, fence = [], None
    for number, text in enumerate(page.read_text().splitlines(), start=1):
        match = FENCE.match(text)
        if match and (fence is None or match.group(1) == fence):
            fence = match.group(1) if fence is None else None
            continue
        lines.append(Line(page, number, text, fence is not None))
    return lines


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: markup dropped, lowercase, every character but
    letters, digits, spaces, `-` and `_` removed, spaces to `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in lines_of(page):
        match = None if line.code else HEADING.match(line.text)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def prose(line: Line) -> str:
    """A line outside code with its inline code spans blanked (a link shown as code is no link)."""
    return INLINE_CODE.sub(lambda match: " " * len(match.group(0)), line.text)


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------


def link_problems(pages: Iterable[Path]) -> list[str]:
    problems = []
    for page in pages:
        for line in lines_of(page):
            if line.code:
                continue
            for target in LINK.findall(prose(line)):
                if re.match(r"(?i)(https?|mailto):", target):
                    continue
                path, _, anchor = target.partition("#")
                resolved = (page.parent / path).resolve() if path else page
                if not resolved.exists():
                    problems.append(f"{line.where()}: link to {target}: {path} does not exist")
                elif anchor and resolved.suffix != ".md":
                    problems.append(f"{line.where()}: link to {target}: #{anchor} in a file that has no headings")
                elif anchor and anchor not in anchors(resolved):
                    problems.append(
                        f"{line.where()}: link to {target}: no heading of {path or page.name} has the anchor #{anchor}"
                    )
    return problems


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    line: Line
    tool: str  # SKY, or `python` and what names the Python tool (SCRIPT, PROGRESS, "python bench/x.py")
    args: tuple[str, ...]  # the words after the tool
    comment_flags: tuple[str, ...]  # --flags its comment names


def split_comment(text: str) -> tuple[str, str]:
    """(code, comment) at the first `#` outside quotes that starts a word, as bash reads it."""
    quote = None
    for index, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            return text[:index], text[index:]
    return text, ""


def code_lines(page: Path) -> Iterator[tuple[Line, str]]:
    """Each shell line a page shows: code block lines with their continuations joined (numbered by
    their first line), then inline code spans."""
    pending: tuple[Line, str] | None = None
    for line in lines_of(page):
        if line.code:
            text = line.text if pending is None else pending[1] + " " + line.text.strip()
            first = line if pending is None else pending[0]
            if text.rstrip().endswith("\\"):
                pending = (first, text.rstrip()[:-1])
                continue
            pending = None
            yield first, text
        else:
            for match in INLINE_CODE.finditer(line.text):
                yield line, match.group(2)
    if pending is not None:
        yield pending


def commands_of(page: Path) -> tuple[list[Command], list[str]]:
    commands, problems = [], []
    for line, text in code_lines(page):
        text = re.sub(r"^\s*\$\s+", "", text)
        code, comment = split_comment(text)
        if not any(TOOL_AT_START.match(part.strip()) for part in re.split(r"&&|\|\||[|;]", code)):
            continue
        lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        try:
            words = list(lexer)
        except ValueError as error:
            problems.append(f"{line.where()}: cannot read the command {code.strip()!r}: {error}")
            continue
        segments: list[list[str]] = [[]]
        for word in words:
            if word in SEPARATORS:
                segments.append([])
            else:
                segments[-1].append(word)
        named = tuple(FLAG.findall(comment))
        for segment in segments:
            match = TOOL_AT_START.match(" ".join(segment))
            if not match:
                continue
            if match.lastgroup == "sky":
                tool, skip = SKY, 1
            else:
                named_by = match.group("python").split()
                tool, skip = " ".join(["python", *named_by]), 1 + len(named_by)
            commands.append(Command(line, tool, tuple(segment[skip:]), named))
            named = ()  # a comment is counted with the first command of its line
    return commands, problems


def option_flags(help_text: str) -> set[str]:
    """The flags an argparse or click --help defines: those on its option lines (two spaces in,
    before the description)."""
    flags = set()
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            flags.update(FLAG.findall(line.strip().split("  ")[0]))
    return flags


def subcommands(help_text: str) -> set[str]:
    """The subcommands a click group's --help lists under `Commands:`."""
    names, listing = set(), False
    for line in help_text.splitlines():
        if line.strip() == "Commands:":
            listing = True
        elif listing and (match := re.match(r"^  (\S+)", line)):
            names.add(match.group(1))
        elif listing and line and not line.startswith(" "):
            listing = False
    return names


class Helps:
    """The --help of each tool, asked once per session."""

    def __init__(self, sky_home: Path) -> None:
        python = Path(os.environ.get("SKYPILOT_PYTHON") or REPO / ".venv-sky" / "bin" / "python")
        self.sky = python.parent / "sky"
        self.sky_home = sky_home
        self.sky_helps: dict[tuple[str, ...], str | None] = {}

    @property
    def script(self) -> set[str]:
        return self.python(SCRIPT)

    @functools.cache
    def python(self, tool: str) -> set[str] | None:
        """The flags of a Python tool (`python bench/x.py`), None where its --help fails."""
        argv = [sys.executable, *tool.split()[1:], "--help"]
        result = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
        return option_flags(result.stdout) if result.returncode == 0 else None

    def sky_help(self, path: tuple[str, ...]) -> str | None:
        """`sky <path> --help`, or None where SkyPilot has no such command."""
        if path not in self.sky_helps:
            self.prefetch([path])
        return self.sky_helps[path]

    def prefetch(self, paths: Iterable[tuple[str, ...]]) -> None:
        if not self.sky.exists():
            pytest.fail(
                f"SkyPilot not found: {self.sky}. These tests need `skypilot` (PyPI) in a separate venv: "
                "python -m venv .venv-sky && .venv-sky/bin/pip install -r tests/requirements-sky.txt, "
                "or set SKYPILOT_PYTHON."
            )
        todo = sorted(set(paths) - set(self.sky_helps))
        env = {
            key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        }
        env.update(HOME=str(self.sky_home), SKYPILOT_DISABLE_USAGE_COLLECTION="1")

        def ask(path: tuple[str, ...]) -> str | None:
            argv = [str(self.sky), *path, "--help"]
            result = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
            return result.stdout if result.returncode == 0 else None

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            self.sky_helps.update(zip(todo, pool.map(ask, todo)))

    def flags(self, command: Command) -> tuple[str, set[str], list[str]]:
        """(the command as named, the flags it takes, what is wrong with its subcommands)."""
        if command.tool != SKY:
            known = self.python(command.tool)
            return command.tool, known or set(), [] if known is not None else [f"`{command.tool} --help` fails"]
        path: tuple[str, ...] = ()
        for word in command.args:
            names = subcommands(self.sky_help(path) or "")
            if not names:
                break
            if word not in names:
                return " ".join((SKY, *path)), set(), [f"`{word}` is not a subcommand of `{' '.join((SKY, *path))}`"]
            path += (word,)
        name, text = " ".join((SKY, *path)), self.sky_help(path)
        if text is None:
            return name, set(), [f"`{name} --help` fails"]
        return name, option_flags(text), []


def sky_paths(commands: Iterable[Command]) -> set[tuple[str, ...]]:
    """Every path a sky command could name (its leading plain words), to ask SkyPilot side by side."""
    paths: set[tuple[str, ...]] = {()}
    for command in commands:
        if command.tool == SKY:
            words = []
            for word in command.args[:3]:
                if not re.fullmatch(r"[a-z][a-z-]*", word):
                    break
                words.append(word)
                paths.add(tuple(words))
    return paths


def command_problems(pages: Iterable[Path], helps: Helps) -> tuple[list[Command], list[str]]:
    commands, problems = [], []
    for page in pages:
        found, unreadable = commands_of(page)
        commands += found
        problems += unreadable
    helps.prefetch(sky_paths(commands))
    for command in commands:
        name, known, wrong = helps.flags(command)
        problems += [f"{command.line.where()}: {message}" for message in wrong]
        if wrong:
            continue
        used = [word.split("=", 1)[0] for word in command.args if FLAG.fullmatch(word.split("=", 1)[0])]
        for flag in [*used, *command.comment_flags]:
            if flag not in known:
                problems.append(f"{command.line.where()}: `{flag}` is not an option of `{name}` (not in its --help)")
    return commands, problems


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> Helps:
    return Helps(tmp_path_factory.mktemp("sky-home"))


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


def test_every_relative_link_and_anchor_of_the_readme_and_docs_resolves():
    assert len(PAGES) > 5, "README.md and the docs/ pages"
    problems = link_problems(PAGES)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_every_flag_of_a_documented_command_is_in_its_tools_help(helps):
    commands, problems = command_problems(PAGES, helps)
    tools = {command.tool for command in commands}
    expected = {SCRIPT, PROGRESS, "python -m sam3_pipeline.hub", "python bench/benchmark.py", SKY}
    assert tools >= expected, f"commands found for {sorted(tools)} only: the reader of pages broke"
    assert not problems, "\n".join(problems)


def test_the_readme_options_table_lists_exactly_the_scripts_flags(helps):
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `-")]
    listed = {flag for row in rows for flag in FLAG.findall(row.split(" | ")[0])}
    assert listed - helps.script == set(), (
        f"README's options table lists flags the script lacks: {sorted(listed - helps.script)}"
    )
    missing = helps.script - listed - {"-h", "--help"}
    assert missing == set(), f"README's options table misses flags of `{SCRIPT} --help`: {sorted(missing)}"


def test_the_benchmark_markers_are_on_the_performance_page_only():
    start, end = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
    for page in PAGES:
        text = page.read_text()
        expected = 1 if page == REPO / "docs" / "performance.md" else 0
        assert (text.count(start), text.count(end)) == (expected, expected), (
            f"{page.relative_to(REPO)}: benchmark markers"
        )
    text = (REPO / "docs" / "performance.md").read_text()
    assert text.index(start) < text.index(end)


# The checks themselves, on pages made to be wrong: each problem is found and says where.


def test_slug_follows_githubs_rule():
    assert slug("What a preemption or a failure costs") == "what-a-preemption-or-a-failure-costs"
    assert slug("SAM3's own post-processing always runs") == "sam3s-own-post-processing-always-runs"
    assert slug("The pipeline around SAM3 (tiny model, CPU)") == "the-pipeline-around-sam3-tiny-model-cpu"
    assert slug("`--summarize` and [the page](x.md)") == "--summarize-and-the-page"
    assert slug("snake_case and 2.5x") == "snake_case-and-25x"


def test_broken_links_and_anchors_are_reported_with_file_and_line(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## Twice\n\n## Twice\n\n```\n## not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "[ok](other.md#twice-1) [ok](#page) [web](https://example.com/#x) `[code](nowhere.md)`\n"
        "[gone](missing.md)\n"
        "[bad anchor](other.md#twice-2)\n"
        "![image](other.md#not-a-heading)\n"
        "[self](#nope)\n"
        "```\n[in code](missing.md)\n```\n"
    )
    problems = link_problems([page])
    assert [problem.split(": ", 1)[0] for problem in problems] == [f"{page}:{n}" for n in (3, 4, 5, 6)], problems
    assert "missing.md does not exist" in problems[0] and "#twice-2" in problems[1] and "#nope" in problems[3]


@pytest.mark.slow
def test_unknown_flags_and_subcommands_are_reported_with_file_line_and_flag(tmp_path, helps):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python process_segmentation.py videos/ --sample-fps 2` or `sky jobs queue`.\n"
        "```bash\n"
        "$ .venv/bin/python process_segmentation.py a.mp4 --no-such-flag  # fine\n"
        "sky jobs launch --pool p --num-jobs 2 \\\n"
        "  --no-such-sky-flag sam3-job.yaml\n"
        "aws s3 sync a b && python3 -m sam3_pipeline.progress out  # --nope lists nothing\n"
        "sky jobs nonesuch --help\n"
        'sky launch -c x t.yaml --env PROMPTS="a;b" -Z\n'
        "python bench/benchmark.py --small --fast\n"
        "python bench/nonesuch.py --small\n"
        "```\n"
    )
    commands, problems = command_problems([page], helps)
    assert {command.tool for command in commands} == {
        SCRIPT,
        PROGRESS,
        SKY,
        "python bench/benchmark.py",
        "python bench/nonesuch.py",
    }
    expected = [
        f"{page}:3: `--no-such-flag` is not an option of `{SCRIPT}`",
        f"{page}:4: `--no-such-sky-flag` is not an option of `sky jobs launch`",
        f"{page}:6: `--nope` is not an option of `{PROGRESS}`",
        f"{page}:7: `nonesuch` is not a subcommand of `sky jobs`",
        f"{page}:8: `-Z` is not an option of `sky launch`",
        f"{page}:9: `--fast` is not an option of `python bench/benchmark.py`",
        f"{page}:10: `python bench/nonesuch.py --help` fails",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problem
