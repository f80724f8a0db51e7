"""Parameter-name patterns (``--adapt``, and the ``adapt`` list a checkpoint stores), matched in linear time.

Python's ``re`` backtracks: ``(.*.*.*.*.*.*.*.*.*.*)*X`` against a 40-character name never returns, and a
pattern can come from a file someone else wrote. So a pattern is never given to ``re`` to match. A regex is
parsed by the standard library's parser (the same syntax as ``re``), compiled to a Thompson automaton and
simulated on the set of its states (Thompson 1968; Cox 2007, "Regular Expression Matching Can Be Simple
And Fast"): the work is at most (name length) × (states), whatever the pattern. A glob (``*``, ``?``,
``[seq]``, ``[!seq]``) is translated to the same automaton. Features that need backtracking
(backreferences, lookarounds, atomic groups, possessive repeats) and flags are refused with a message;
parameter names need none of them. Pattern length, pattern count, automaton size and name length are
bounded (:mod:`mamlkit.base.limits`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

from mamlkit.base.errors import UserError
from mamlkit.base.limits import MAX_NAME_LENGTH, MAX_PATTERN_LENGTH, MAX_PATTERN_STATES, MAX_PATTERNS

try:  # the standard library's regex parser (``sre_parse`` before Python 3.11)
    from re import _constants as _c
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]


class PatternError(UserError, ValueError):
    """A parameter-name pattern that is too long, too large or uses a feature the matcher refuses."""


# Automaton states: ["char", predicate, next] consumes one character; ["split", [nexts]] and
# ["at", at_start, next] consume none; ["match"] accepts.


class _Builder:
    """Thompson's construction over the parse tree of ``re._parser``; states are list indices."""

    def __init__(self, pattern: str):
        self.pattern, self.states = pattern, []

    def add(self, state: list) -> int:
        if len(self.states) >= MAX_PATTERN_STATES:
            raise PatternError(f"pattern {self.pattern!r} expands to more than {MAX_PATTERN_STATES:,} automaton "
                               "states (large repeat counts such as {1000}); write a shorter pattern")
        self.states.append(state)
        return len(self.states) - 1

    def seq(self, items, nxt: int) -> int:
        """States matching the parsed sequence ``items`` and then continuing at ``nxt``; returns the entry."""
        for op, arg in reversed(list(items)):
            nxt = self.item(op, arg, nxt)
        return nxt

    def item(self, op, arg, nxt: int) -> int:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            return self.add(["char", _predicate(op, arg), nxt])
        if op is _c.SUBPATTERN:
            _, add_flags, del_flags, items = arg
            if add_flags or del_flags:
                self.refuse("inline flags such as (?i:...)")
            return self.seq(items, nxt)
        if op is _c.BRANCH:
            return self.add(["split", [self.seq(alt, nxt) for alt in arg[1]]])
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # greedy or lazy: the same set of matches
            return self.repeat(*arg, nxt)
        if op is _c.AT and arg in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING, _c.AT_END, _c.AT_END_STRING):
            return self.add(["at", arg in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING), nxt])
        self.refuse({_c.GROUPREF: "backreferences", _c.ASSERT: "lookarounds", _c.ASSERT_NOT: "lookarounds",
                     _c.AT: "word boundaries"}.get(op, str(op).lower().replace("_", " ")))

    def repeat(self, low: int, high: int, items, nxt: int) -> int:
        unbounded = high >= _c.MAXREPEAT
        if low > MAX_PATTERN_STATES or (not unbounded and high > MAX_PATTERN_STATES):
            raise PatternError(f"pattern {self.pattern!r} repeats up to {max(low, 0 if unbounded else high):,} "
                               f"times, more than the limit of {MAX_PATTERN_STATES:,}; write a shorter pattern")
        if unbounded:  # a loop: split -> (items -> back to split) | nxt
            loop = self.add(["split", []])
            self.states[loop][1] = [self.seq(items, loop), nxt]
            tail = loop
        else:
            tail = nxt
            for _ in range(high - low):  # optional copies, innermost first: (x(x(x)?)?)?
                tail = self.add(["split", [self.seq(items, tail), nxt]])
        for _ in range(low):
            tail = self.seq(items, tail)
        return tail

    def refuse(self, feature: str) -> None:
        raise PatternError(f"pattern {self.pattern!r} uses {feature}, which parameter-name patterns do not "
                           "support (they are matched without backtracking); use a glob such as 'head.*' or a "
                           "plain regex such as 'encoder\\.layer\\.[45]\\..*'")


def _predicate(op, arg) -> Callable[[str], bool]:
    if op is _c.LITERAL:
        return chr(arg).__eq__
    if op is _c.NOT_LITERAL:
        return chr(arg).__ne__
    if op is _c.ANY:
        return lambda ch: ch != "\n"
    negate = bool(arg) and arg[0][0] is _c.NEGATE
    tests = [_class_item(o, a) for o, a in arg if o is not _c.NEGATE]
    return lambda ch: any(t(ch) for t in tests) != negate


_CATEGORIES = {
    _c.CATEGORY_DIGIT: str.isdigit, _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdigit(),
    _c.CATEGORY_SPACE: str.isspace, _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    _c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
}


def _class_item(op, arg) -> Callable[[str], bool]:
    if op is _c.LITERAL:
        return chr(arg).__eq__
    if op is _c.RANGE:
        return lambda ch, lo=arg[0], hi=arg[1]: lo <= ord(ch) <= hi
    if op is _c.CATEGORY and arg in _CATEGORIES:
        return _CATEGORIES[arg]
    raise PatternError(f"character class item {op} {arg} is not supported in parameter-name patterns")


class Automaton:
    """A compiled pattern; :meth:`fullmatch` says whether it matches a whole name, in linear time."""

    def __init__(self, pattern: str, items):
        builder = _Builder(pattern)
        accept = builder.add(["match"])
        try:
            self.start = builder.seq(items, accept)
        except RecursionError:
            raise PatternError(f"pattern {pattern[:80]!r}... nests groups too deep; write a flatter pattern") from None
        self.states = builder.states

    def _closure(self, states: set[int], pos: int, end: int) -> set[int]:
        """``states`` and every state reachable from them without consuming a character at ``pos``."""
        out, todo = set(), list(states)
        while todo:
            s = todo.pop()
            if s in out:
                continue
            out.add(s)
            state = self.states[s]
            if state[0] == "split":
                todo.extend(state[1])
            elif state[0] == "at" and (pos == 0 if state[1] else pos == end):
                todo.append(state[2])
        return out

    def fullmatch(self, name: str) -> bool:
        current = self._closure({self.start}, 0, len(name))
        for pos, ch in enumerate(name):
            moved = {st[2] for s in current if (st := self.states[s])[0] == "char" and st[1](ch)}
            if not moved:
                return False
            current = self._closure(moved, pos + 1, len(name))
        return any(self.states[s][0] == "match" for s in current)


def _parse_regex(pattern: str) -> Automaton | None:
    """The automaton of ``pattern`` read as a regex, or None when it is not one (``*.layer.5.*``)."""
    try:
        with warnings.catch_warnings():  # "possible nested set" for a glob's '[[]': the glob reading applies
            warnings.simplefilter("ignore", FutureWarning)
            parsed = _sre.parse(pattern)
    except (_c.error, RecursionError, OverflowError):
        return None
    if parsed.state.flags & ~_c.SRE_FLAG_UNICODE:
        _Builder(pattern).refuse("flags such as (?i)")
    return Automaton(pattern, parsed)


def _glob_regex(glob: str) -> str:
    """``glob`` (``fnmatch`` syntax: ``*``, ``?``, ``[seq]``, ``[!seq]``) as an equivalent regex."""
    import re

    out, i, n = [], 0, len(glob)
    while i < n:
        ch, i = glob[i], i + 1
        if ch == "*":
            out.append("[\\s\\S]*")  # any character, newlines included, as in fnmatch
        elif ch == "?":
            out.append("[\\s\\S]")
        elif ch == "[":
            j = i + (i < n and glob[i] == "!")
            j += j < n and glob[j] == "]"
            j = glob.find("]", j)
            if j < 0:  # no closing bracket: a literal '['
                out.append("\\[")
                continue
            body = glob[i:j].replace("\\", "\\\\")
            i = j + 1
            body = "^" + body[1:] if body.startswith("!") else ("\\" + body if body.startswith("^") else body)
            out.append(f"[{body}]")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def _glob(pattern: str) -> Automaton | None:
    """The automaton of ``pattern`` read as a glob, or None when its brackets make no class (``[z-a]``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return Automaton(pattern, _sre.parse(_glob_regex(pattern)))
    except (_c.error, RecursionError, OverflowError):
        return None


def check_patterns_bounds(patterns: Sequence[str], what: str = "adapt") -> None:
    """Refuse more than MAX_PATTERNS patterns or one longer than MAX_PATTERN_LENGTH characters."""
    if len(patterns) > MAX_PATTERNS:
        raise PatternError(f"{what}: {len(patterns)} patterns, more than the limit of {MAX_PATTERNS}; merge them "
                           "into fewer globs or regexes")
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise PatternError(f"{what}: a pattern is a string, got {type(pattern).__name__}")
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise PatternError(f"{what}: a pattern of {len(pattern):,} characters, more than the limit of "
                               f"{MAX_PATTERN_LENGTH}; write a shorter glob or regex")


def compile_patterns(patterns: Sequence[str], what: str = "adapt") -> Callable[[str], bool]:
    """``passes(name)``: whether any of ``patterns`` matches the whole ``name`` as a glob or as a regex.

    Raises :class:`PatternError` (a ``UserError``) for too many or too long patterns and for regex
    features that need backtracking. A name longer than MAX_NAME_LENGTH characters is refused when matched.
    """
    check_patterns_bounds(patterns, what)
    compiled = [(_glob(p), _parse_regex(p)) for p in patterns]
    # A model's parameter names are few and asked for again at every meta-iteration (the per-task
    # function splits them), while a match simulates automata in Python: each name is matched once.
    known: dict[str, bool] = {}

    def passes(name: str) -> bool:
        if name in known:
            return known[name]
        if len(name) > MAX_NAME_LENGTH:
            raise PatternError(f"parameter name of {len(name):,} characters, more than the limit of "
                               f"{MAX_NAME_LENGTH} that {what} patterns are matched against")
        known[name] = any((g is not None and g.fullmatch(name)) or (r is not None and r.fullmatch(name))
                          for g, r in compiled)
        return known[name]

    return passes


__all__ = ["PatternError", "compile_patterns", "check_patterns_bounds", "Automaton"]
