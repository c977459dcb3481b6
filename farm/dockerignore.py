"""``.dockerignore`` patterns with docker's semantics (``moby/patternmatcher``).

* one pattern per line; blank lines and lines starting with ``#`` are ignored;
* patterns are cleaned like paths and a leading ``/`` is dropped (everything is context-relative);
* ``*`` and ``?`` stop at ``/``, ``**`` crosses folders, ``[...]`` and ``\\`` escapes work;
* a pattern that matches a folder excludes everything inside it;
* ``!pattern`` re-includes; the last matching pattern wins.

Pure: no I/O here.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from farm.errors import ContextError

__all__ = ["IgnoreRules", "parse_dockerignore"]


@dataclass(frozen=True)
class _Pattern:
    text: str
    regex: re.Pattern[str]
    exclusion: bool  # written with a leading "!": re-includes what it matches


@dataclass(frozen=True)
class IgnoreRules:
    patterns: tuple[_Pattern, ...] = ()

    def is_ignored(self, path: str) -> bool:
        """Whether a context-relative path (``a/b/c``) is excluded from the context."""
        if not self.patterns:
            return False
        parents = _parents(path)
        ignored = False
        for pattern in self.patterns:
            if any(pattern.regex.fullmatch(candidate) for candidate in parents):
                ignored = not pattern.exclusion
        return ignored

    def may_include_below(self, folder: str) -> bool:
        """Whether some ``!`` pattern could re-include a path inside an ignored ``folder``."""
        prefix = folder + "/"
        for pattern in self.patterns:
            if not pattern.exclusion:
                continue
            literal = _literal_prefix(pattern.text)
            if literal.startswith(prefix) or prefix.startswith(literal):
                return True
        return False


def parse_dockerignore(text: str) -> IgnoreRules:
    patterns = []
    # As moby's ignorefile reader: lines end at "\n" only, a UTF-8 BOM is dropped, and only a "#"
    # in the first column starts a comment.
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        cleaned = posixpath.normpath(line).lstrip("/")
        if cleaned in ("", "."):
            continue
        try:
            regex = re.compile(_translate(cleaned))
        except (re.error, ValueError) as exc:
            raise ContextError(f".dockerignore line {number}: bad pattern {line!r}: {exc}") from exc
        patterns.append(_Pattern(cleaned, regex, exclusion))
    return IgnoreRules(tuple(patterns))


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]


def _literal_prefix(pattern: str) -> str:
    for index, char in enumerate(pattern):
        if char in "*?[\\":
            return pattern[:index]
    return pattern


_WILDCARDS = frozenset("*?[]\\")


def _translate(pattern: str) -> str:
    """A pattern as an anchored regular expression, following patternmatcher's translation."""
    out = []
    index = 0
    length = len(pattern)
    while index < length:
        char = pattern[index]
        if char == "*":
            if index + 1 < length and pattern[index + 1] == "*":
                index += 1
                if index + 1 < length and pattern[index + 1] == "/":
                    # "**/" matches zero or more whole folders.
                    index += 1
                    out.append("(?:.*/)?")
                elif index + 1 == length or (index == 1 and not _WILDCARDS.intersection(pattern[2:])):
                    # A trailing "**", or a leading one before plain text (patternmatcher's prefix
                    # and suffix matches), is any text at all.
                    out.append(".*")
                else:
                    # Anywhere else patternmatcher turns "**" into zero or more whole folders too.
                    out.append("(?:.*/)?")
            else:
                out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\":
            index += 1
            if index >= length:
                raise ValueError("pattern ends with a backslash")
            out.append(re.escape(pattern[index]))
        elif char == "[":
            end = pattern.find("]", index + 1)
            if end < 0:
                raise ValueError("unterminated character class")
            # Passed to the regular expression as written: "^" negates, "!" does not (Go's regexp).
            body = pattern[index + 1 : end]
            out.append(f"[{body}]")
            index = end
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out)
