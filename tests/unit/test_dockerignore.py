"""farm.dockerignore: docker's .dockerignore semantics (moby/patternmatcher and its ignorefile reader).

Besides examples, the rules are checked against ``_Moby``, a line-by-line transliteration of
``ignorefile.ReadAll`` and ``PatternMatcher.MatchesOrParentMatches`` (moby/patternmatcher @5a6d842),
on generated pattern files and paths.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from farm.dockerignore import IgnoreRules, parse_dockerignore
from farm.errors import ContextError

_SETTINGS = settings(database=None, deadline=None, max_examples=100)


def ignored(text: str, *paths: str) -> list[bool]:
    rules = parse_dockerignore(text)
    return [rules.is_ignored(path) for path in paths]


def test_empty_file_ignores_nothing() -> None:
    assert parse_dockerignore("") == IgnoreRules()
    assert ignored("", "a", "a/b") == [False, False]
    assert ignored("\n\n   \n# only a comment\n", "a") == [False]


def test_literal_patterns_are_anchored_at_the_context_root() -> None:
    assert ignored("secret.txt", "secret.txt", "sub/secret.txt", "secret.txt.bak") == [True, False, False]
    assert ignored("sub/secret.txt", "sub/secret.txt", "secret.txt") == [True, False]


def test_comments_blank_lines_and_surrounding_space() -> None:
    text = "# a comment\n\n   build   \n\t# indented: a pattern, not a comment\n"
    assert ignored(text, "build", "# a comment", "# indented: a pattern, not a comment") == [
        True,
        False,
        True,
    ]


def test_crlf_and_utf8_bom() -> None:
    assert ignored("\ufeffnode_modules\r\n*.log\r\n", "node_modules", "x.log") == [True, True]


def test_a_folder_pattern_excludes_everything_inside() -> None:
    assert ignored("build", "build", "build/out/a.o", "builder") == [True, True, False]
    assert ignored("build/", "build/x") == [True]


def test_leading_slash_and_dot_segments_are_cleaned() -> None:
    assert ignored("/build", "build/x") == [True]
    assert ignored("//build//out/", "build/out/x") == [True]
    assert ignored("./a/../build", "build") == [True]
    assert ignored("*\n!/keep", "keep", "other") == [False, True]
    # "/" and "." clean to nothing that a context path can be.
    assert ignored("/\n.\n", "a") == [False]


def test_star_and_question_mark_stay_within_a_folder() -> None:
    assert ignored("*.md", "README.md", "docs/README.md") == [True, False]
    assert ignored("*/*.md", "docs/README.md", "docs/x/README.md") == [True, False]
    assert ignored("?.txt", "a.txt", "ab.txt", "/.txt") == [True, False, False]


def test_double_star_crosses_folders() -> None:
    assert ignored("**/*.pyc", "a.pyc", "x/a.pyc", "x/y/a.pyc", "x/a.py") == [True, True, True, False]
    assert ignored("**/build", "build", "a/build/x", "a/rebuild") == [True, True, False]
    assert ignored("docs/**", "docs", "docs/a", "docs/a/b") == [False, True, True]
    assert ignored("a/**/z", "a/z", "a/b/z", "a/b/c/z", "az") == [True, True, True, False]
    assert ignored("**", "a", "a/b") == [True, True]


def test_double_star_not_before_a_slash() -> None:
    # A leading "**" before plain text is a suffix match...
    assert ignored("**.log", "a.log", "x/y.log", "log") == [True, True, False]
    # ...but elsewhere patternmatcher turns "**" into "any folders", so "a**b" needs a '/' to cross.
    assert ignored("a**b", "ab", "a/b", "ax/b", "axb") == [True, True, True, False]


def test_escapes_and_character_classes() -> None:
    assert ignored("\\*.txt", "*.txt", "a.txt") == [True, False]
    assert ignored("[ab].txt", "a.txt", "b.txt", "c.txt") == [True, True, False]
    assert ignored("[^a].txt", "a.txt", "c.txt") == [False, True]
    # Go's regexp is what matches: '!' is not a negation inside a class, only '^' is.
    assert ignored("[!a].txt", "!.txt", "a.txt", "c.txt") == [True, True, False]
    assert ignored("a+b(c)", "a+b(c)", "aab(c)") == [True, False]


def test_exclamation_reincludes_and_the_last_match_wins() -> None:
    text = "*.md\n!README.md"
    assert ignored(text, "a.md", "README.md") == [True, False]
    text = "!README.md\n*.md"
    assert ignored(text, "README.md") == [True]
    text = "docs\n!docs/keep\ndocs/keep/tmp"
    assert ignored(text, "docs/a", "docs/keep", "docs/keep/x", "docs/keep/tmp/y") == [
        True,
        False,
        False,
        True,
    ]


def test_reinclusion_of_a_folder_reincludes_its_contents() -> None:
    assert ignored("*\n!src", "src", "src/main.py", "other") == [False, False, True]


@pytest.mark.parametrize("line", ["[abc", "a\\", "x/[", "!foo\\"])
def test_bad_patterns_name_the_line(line: str) -> None:
    with pytest.raises(ContextError, match="line 2"):
        parse_dockerignore(f"ok\n{line}\n")


@pytest.mark.parametrize(
    ("patterns", "folder", "expected"),
    [
        ("build", "build", False),
        ("build\n!build/keep.txt", "build", True),
        ("build\n!build/sub/*.txt", "build", True),
        ("build\n!build/sub/*.txt", "build/sub", True),
        ("build\n!build/sub/*.txt", "build/other", False),
        ("build\n!buildx/a", "build", False),
        ("build\n!*.txt", "build", True),  # the literal part "" could be anything
        ("build\n!**/keep", "build", True),
        ("a/b\n!a", "a/b", True),
        ("a\n!b/c", "a", False),
    ],
)
def test_may_include_below(patterns: str, folder: str, expected: bool) -> None:
    assert parse_dockerignore(patterns).may_include_below(folder) is expected


# --- the reference: moby/patternmatcher, transliterated --------------------------------------------


def _go_clean(path: str) -> str:
    """Go's path.Clean."""
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    cleaned = "/".join(parts)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def _read_all(text: str) -> list[str]:
    """ignorefile.ReadAll."""
    excludes = []
    for number, line in enumerate(text.split("\n")):
        line = line.removesuffix("\r")  # bufio.ScanLines
        if number == 0:
            line = line.removeprefix("\ufeff")
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        invert = line[0] == "!"
        if invert:
            line = line[1:].strip()
        if line:
            line = _go_clean(line)
            if len(line) > 1 and line[0] == "/":
                line = line[1:]
        if invert:
            line = "!" + line
        excludes.append(line)
    return excludes


@dataclass
class _MobyPattern:
    cleaned: str
    exclusion: bool
    kind: str = ""
    regex: re.Pattern[str] | None = None

    def compile(self) -> None:
        reg = "^"
        kind = "exact"
        pattern = self.cleaned
        i = 0
        position = 0
        while position < len(pattern):
            ch = pattern[position]
            position += 1
            peek = pattern[position] if position < len(pattern) else None
            if ch == "*":
                if peek == "*":
                    position += 1
                    if position < len(pattern) and pattern[position] == "/":
                        position += 1
                    if position >= len(pattern):
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            reg += ".*"
                            kind = "regexp"
                    else:
                        reg += "(.*/)?"
                        kind = "regexp"
                    if i == 0:
                        kind = "suffix"
                else:
                    reg += "[^/]*"
                    kind = "regexp"
            elif ch == "?":
                reg += "[^/]"
                kind = "regexp"
            elif ch in ".+()|{}$":
                reg += "\\" + ch
            elif ch == "\\":
                if peek is not None:
                    reg += "\\" + peek
                    position += 1
                    kind = "regexp"
                else:
                    reg += "\\"
            elif ch in "[]":
                reg += ch
                kind = "regexp"
            else:
                reg += ch
            i += 1
        if kind == "regexp":
            self.regex = re.compile(reg + "$")
        self.kind = kind

    def match(self, path: str) -> bool:
        if not self.kind:
            self.compile()
        if self.kind == "exact":
            return path == self.cleaned
        if self.kind == "prefix":
            return path.startswith(self.cleaned[:-2])
        if self.kind == "suffix":
            suffix = self.cleaned[2:]
            if path.endswith(suffix):
                return True
            return suffix[0] == "/" and path == suffix[1:]
        assert self.regex is not None
        return self.regex.match(path) is not None


class _Moby:
    def __init__(self, text: str) -> None:
        self.patterns = []
        for line in _read_all(text):
            pattern = _go_clean(line.strip())
            exclusion = pattern[0] == "!"
            if exclusion:
                pattern = pattern[1:]
            self.patterns.append(_MobyPattern(pattern, exclusion))

    def matches_or_parent_matches(self, file: str) -> bool:
        matched = False
        parent = posixpath.dirname(file) or "."
        parent_dirs = parent.split("/")
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue
            match = pattern.match(file)
            if not match and parent != ".":
                for i in range(len(parent_dirs)):
                    match = pattern.match("/".join(parent_dirs[: i + 1]))
                    if match:
                        break
            if match:
                matched = not pattern.exclusion
        return matched


_TOKENS = ["a", "b", ".", "/", "*", "**", "?", "[ab]", "[!a]", "[^b]", "\\*", "..", "+"]
_PREFIXES = ["", "", "", "!", "/", "!/", " ", "#", " #", "! "]
_NAMES = ["a", "b", "ab", "ba", "a.b", ".a", "b*", "+", "!a", "#a"]

_lines = st.builds(
    lambda prefix, tokens, suffix: prefix + "".join(tokens) + suffix,
    st.sampled_from(_PREFIXES),
    st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=5),
    st.sampled_from(["", "", "/", " ", "\r"]),
)
_files = st.builds(
    lambda bom, lines: bom + "\n".join(lines),
    st.sampled_from(["", "\ufeff"]),
    st.lists(_lines, max_size=4),
)
_paths = st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4).map("/".join)


@_SETTINGS
@given(_files, st.lists(_paths, min_size=1, max_size=6))
@example("a**b", ["axb", "ax/b"])
@example("**a*", ["ba", "b/ba"])
@example("[!a]", ["!", "b"])
@example(" #a", ["#a"])
@example("\ufeffa", ["a"])
def test_agrees_with_moby_patternmatcher(text: str, paths: list[str]) -> None:
    rules = parse_dockerignore(text)
    moby = _Moby(text)
    for path in paths:
        assert rules.is_ignored(path) == moby.matches_or_parent_matches(path), (text, path)


@_SETTINGS
@given(_files, _paths, _paths)
def test_nothing_below_a_folder_comes_back_unless_may_include_below_says_so(
    text: str, folder: str, rest: str
) -> None:
    rules = parse_dockerignore(text)
    if rules.is_ignored(folder) and not rules.is_ignored(f"{folder}/{rest}"):
        assert rules.may_include_below(folder)


_LITERAL = st.text(
    alphabet=st.characters(exclude_characters="/\n\r\x00", exclude_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda name: name == name.strip() and name not in (".", ".."))


@_SETTINGS
@given(_LITERAL)
def test_an_escaped_name_matches_exactly_that_name(name: str) -> None:
    escaped = re.sub(r"([*?\[\]\\])", r"\\\1", name)
    if escaped.startswith(("#", "!")):
        escaped = "\\" + escaped
    rules = parse_dockerignore(f"# the name, escaped\n{escaped}\n")
    assert rules.is_ignored(name)
    assert rules.is_ignored(f"{name}/inside")
    assert not rules.is_ignored(f"{name}x")
    parent = "y" if name == "x" else "x"  # x/x is inside an ignored x: ignored, rightly
    assert not rules.is_ignored(f"{parent}/{name}")
