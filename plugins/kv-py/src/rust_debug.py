"""Rust's `{:?}` for strings, in Python.

The Rust kv quotes user input in its error messages with `{:?}`, e.g.
`unknown command "frob": ...`. kv-py must produce the same bytes, so this
module reproduces Rust's `Debug for str` exactly:

- the text is wrapped in double quotes;
- `\\0`, `\\t`, `\\n`, `\\r`, `\\"` and `\\\\` get their short escapes
  (a single quote is *not* escaped, unlike Python's repr);
- every other character Rust deems unprintable or grapheme-extending
  (controls, U+00A0, soft hyphen, combining marks, unassigned code points, ...)
  becomes `\\u{hex}` in lowercase hex without leading zeros;
- everything else is copied as is.

Which characters are escaped comes from Rust's own Unicode tables, dumped by
`tools/rust_escapes.rs` into `rust_escapes.py`; Python's `str.isprintable` uses
a different Unicode version and rules, so it cannot stand in for them.

Every call runs on a fuel budget, so the work per character is left to C
code (str methods, the regex engine) rather than a Python loop: quoting a
megabyte-long word must not run out of fuel.
"""

from bisect import bisect_right
import re

from rust_escapes import ESCAPED_RANGES

_STARTS = ESCAPED_RANGES[0::2]
_ENDS = ESCAPED_RANGES[1::2]

_SHORT = {"\0": "\\0", "\t": "\\t", "\n": "\\n", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def _is_escaped(ch: str) -> bool:
    cp = ord(ch)
    i = bisect_right(_STARTS, cp) - 1
    return i >= 0 and cp <= _ENDS[i]


def _escape(ch: str) -> str:
    return _SHORT.get(ch) or "\\u{%x}" % ord(ch)


def _char_class(pairs) -> str:
    return "".join(
        re.escape(chr(start)) + ("-" + re.escape(chr(end)) if end > start else "")
        for start, end in pairs
    )


# The escaped characters of the Basic Multilingual Plane as one regex class:
# the regex engine tests BMP classes with a lookup table, in constant time
# per character. (Adding the ~460 ranges above U+FFFF would make it test them
# one by one for every character, so characters there go through
# _is_escaped, once per distinct character.)
_ESCAPED_BMP = re.compile(
    "["
    + _char_class((start, min(end, 0xFFFF)) for start, end in zip(_STARTS, _ENDS) if start <= 0xFFFF)
    + "]"
)
_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")


def debug_str(text: str) -> str:
    """`format!("{:?}", text)` as Rust prints it."""
    # Printable ASCII without `"` or `\`, the usual case: nothing to escape.
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    escaped = set(_ESCAPED_BMP.findall(text))
    escaped.update(ch for ch in set(_ASTRAL.findall(text)) if _is_escaped(ch))
    if len(escaped) <= 8:
        # A few distinct characters: one fast replace each. Backslash first,
        # since the other escapes put backslashes in.
        for ch in sorted(escaped, key=lambda ch: ch != "\\"):
            text = text.replace(ch, _escape(ch))
    else:
        text = text.translate({ord(ch): _escape(ch) for ch in escaped})
    return '"' + text + '"'
