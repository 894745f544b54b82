"""kv: the sample key-value state machine for raftify-host, in Python.

A line-for-line port of the Rust kv (plugins/kv/src/lib.rs): same command
language, same entry bytes, same results, same error messages and the same
snapshot format, so a cluster can hot-swap between the two and keep its state.

This module is plain Python with no WebAssembly in sight: `app.py` wires it to
the component's exports, and `tests/test_kv.py` runs it with `python3`.

The command language (fixed by DESIGN.md; tests and docs rely on it):

    command          kind       result
    set K V          proposal   OK
    del K            proposal   1 if K existed, else 0
    incr K [BY]      proposal   the new integer (K absent counts as 0)
    append K V       proposal   OK; V joins the space-separated list at K
    get K            query      the value, or (nil)
    len              query      the number of keys

Keys and values are UTF-8 words without whitespace. Entry bytes are the
canonical command text: words joined by one space, `incr` always with its
increment (`incr n` is stored as `incr n 1`).

Determinism: everything here depends only on the state and the input. The
state is a plain dict, and the snapshot sorts it, so iteration order never
leaks into results. Nothing reads the clock or randomness.
"""

import itertools
import re
import struct

from rust_debug import debug_str


class KvError(Exception):
    """An expected error: the call returns WIT `err` with this message.

    Raised for bad input (never for bugs). `apply` raises it *before* touching
    the state, so an error leaves the state unchanged, as the ABI requires.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# --- Text helpers that match Rust exactly -----------------------------------

# Rust's `split_whitespace` splits on `char::is_whitespace` (Unicode
# White_Space). Python's `str.split()` also splits on U+001C..U+001F, which
# Rust keeps inside words, so text holding those takes a slower, exact path.
_RUST_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD = re.compile("[^" + _RUST_WHITESPACE + "]+")
_PYTHON_ONLY_WHITESPACE = ("\x1c", "\x1d", "\x1e", "\x1f")


def split_words(text: str, limit: int) -> list:
    """The first `limit` words of `text.split_whitespace()` (fewer if the
    text has fewer).

    Stopping early keeps a huge entry cheap: every call runs on a fuel budget,
    and a command with more words than any command takes is an error anyway,
    so splitting all of a megabyte of words would only burn fuel.
    """
    if any(ch in text for ch in _PYTHON_ONLY_WHITESPACE):
        return [match.group() for match in itertools.islice(_WORD.finditer(text), limit)]
    # At most limit + 1 pieces: `limit` words, then the unsplit rest.
    return text.split(None, limit)[:limit]


I64_MIN = -(2**63)
I64_MAX = 2**63 - 1


def parse_i64(text: str):
    """The integer `text` spells as Rust's `str::parse::<i64>` reads it, or
    None: one optional sign, then ASCII digits, in range.

    Python's `int()` is more lenient (`1_000`, ` 7 `, Arabic-Indic digits)
    and refuses more than 4300 digits, which Rust reads fine when they are
    leading zeros (`incr k 000...07`), so check the shape first.
    """
    digits = text[1:] if text[:1] in ("+", "-") else text
    # str.isdigit() alone would accept non-ASCII digits. Checking ASCII bytes
    # is also several times cheaper in fuel for a huge word. b"" is not digits.
    if not digits.isascii():
        return None
    digits = digits.encode()
    if not digits.isdigit():
        return None
    digits = digits.lstrip(b"0") or b"0"
    if len(digits) > 19:  # more digits than any i64 has
        return None
    value = -int(digits) if text[0] == "-" else int(digits)
    if not I64_MIN <= value <= I64_MAX:
        return None
    return value


# --- Commands ---------------------------------------------------------------

# A parsed command is a tuple: the verb, then its arguments, e.g.
# ("set", "a", "1"), ("incr", "n", 5), ("len",). Joining its parts with one
# space gives the canonical text (`incr`'s increment is an int, printed
# without `+` or leading zeros, as Rust prints an i64).
QUERIES = ("get", "len")


def canonical(command: tuple) -> str:
    """The canonical text of a command: the entry bytes kv stores."""
    return " ".join(str(part) for part in command)


def is_proposal(command: tuple) -> bool:
    """Whether the command changes state (and so must go through the log)."""
    return command[0] not in QUERIES


def usage_error(usage: str) -> KvError:
    return KvError("wrong number of arguments: usage: " + usage)


def not_utf8(what: str) -> KvError:
    return KvError(what + " is not UTF-8 text")


class Kv:
    """The whole replicated state (a dict of str to str) and its commands.

    Subclass it to extend the language: override `parse_words` to accept new
    verbs and `execute` (proposals) or `read` (queries) to run them. See
    plugins/stamp-py for an example.
    """

    # The most words a command of this language has (`set K V`). Parsing
    # reads one word more, enough to tell "too many" without splitting a
    # huge entry whole.
    max_words = 3

    def __init__(self):
        self.map = {}

    # --- Parsing (pure: never looks at self.map) ----------------------------

    def parse(self, text: str) -> tuple:
        """Parse command text. Every error names what was wrong and what was
        expected."""
        return self.parse_words(split_words(text, self.max_words + 1))

    def parse_words(self, words: list) -> tuple:
        """Parse split text. `words` holds at most `max_words + 1` words: a
        longer command is cut there, which is still one word too many."""
        if not words:
            raise KvError("empty command")
        verb, args = words[0], words[1:]
        if verb == "set":
            if len(args) != 2:
                raise usage_error("set KEY VALUE")
            return ("set", args[0], args[1])
        if verb == "del":
            if len(args) != 1:
                raise usage_error("del KEY")
            return ("del", args[0])
        if verb == "incr":
            if len(args) == 1:
                return ("incr", args[0], 1)
            if len(args) == 2:
                by = parse_i64(args[1])
                if by is None:
                    raise KvError(f"increment {debug_str(args[1])} is not an integer")
                return ("incr", args[0], by)
            raise usage_error("incr KEY [BY]")
        if verb == "append":
            if len(args) != 2:
                raise usage_error("append KEY VALUE")
            return ("append", args[0], args[1])
        if verb == "get":
            if len(args) != 1:
                raise usage_error("get KEY")
            return ("get", args[0])
        if verb == "len":
            if args:
                raise usage_error("len")
            return ("len",)
        raise KvError(
            f"unknown command {debug_str(verb)}: expected set, del, incr, append, get or len"
        )

    def parse_bytes(self, data: bytes) -> tuple:
        """Parse entry or query bytes, which are untrusted: maybe not UTF-8."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise not_utf8("command") from None
        return self.parse(text)

    # --- The state machine ---------------------------------------------------

    def apply(self, index: int, entry: bytes) -> bytes:
        """Apply one committed entry. kv ignores the index."""
        return self.execute(index, self.parse_bytes(entry)).encode()

    def query(self, request: bytes) -> bytes:
        """Answer a read-only request. Never changes the state."""
        return self.read(self.parse_bytes(request)).encode()

    def execute(self, index: int, command: tuple) -> str:
        """Run a proposal. Computes the result first and mutates last, so an
        error leaves the state untouched."""
        verb = command[0]
        if verb == "set":
            _, key, value = command
            self.map[key] = value
            return "OK"
        if verb == "del":
            _, key = command
            if key not in self.map:
                return "0"
            del self.map[key]
            return "1"
        if verb == "incr":
            _, key, by = command
            current = self.map.get(key)
            if current is None:
                current = 0
            else:
                current = parse_i64(current)
                if current is None:
                    raise KvError(f"value of {debug_str(key)} is not an integer")
            new = current + by
            if not I64_MIN <= new <= I64_MAX:
                raise KvError(f"incr would overflow the value of {debug_str(key)}")
            self.map[key] = str(new)
            return str(new)
        if verb == "append":
            _, key, value = command
            old = self.map.get(key)
            self.map[key] = value if old is None else old + " " + value
            return "OK"
        if verb in QUERIES:
            raise KvError(
                f"{debug_str(canonical(command))} is a query, not a proposal: use `query`"
            )
        raise AssertionError(f"execute: unhandled command {command!r}")

    def read(self, command: tuple) -> str:
        verb = command[0]
        if verb == "get":
            return self.map.get(command[1], "(nil)")
        if verb == "len":
            return str(len(self.map))
        raise KvError(
            f"{debug_str(canonical(command))} changes state, so it is a proposal,"
            " not a query: use `propose`"
        )

    def snapshot(self) -> bytes:
        return encode_snapshot(self.map)

    def restore(self, snapshot: bytes) -> None:
        """Replace the state with a snapshot's, or raise and change nothing."""
        self.map = decode_snapshot(snapshot)

    # --- The codec (pure: never looks at self.map) ---------------------------

    def encode(self, text: str) -> bytes:
        """Command text (proposal or query) to its canonical entry bytes."""
        return canonical(self.parse(text)).encode()

    def decode(self, entry: bytes) -> str:
        """Entry bytes back to text: entries already are text."""
        try:
            return entry.decode("utf-8")
        except UnicodeDecodeError:
            raise not_utf8("entry") from None

    def render(self, response: bytes) -> str:
        """Results are text too."""
        try:
            return response.decode("utf-8")
        except UnicodeDecodeError:
            raise not_utf8("response") from None


# --- The shared kv snapshot format (plugins/kv/README.md) --------------------
#
#   magic   4 bytes   "RKV1"
#   count   u64 LE    number of pairs
#   pairs   count x { key_len u32 LE, key (UTF-8), value_len u32 LE, value (UTF-8) }
#
# Pairs sorted by key bytes, ascending, no duplicates, nothing after the last
# pair. Python orders str by code point, which is the same order as UTF-8
# bytes, so `sorted()` matches Rust's BTreeMap<String, _>.

SNAPSHOT_MAGIC = b"RKV1"


def encode_snapshot(map: dict) -> bytes:
    out = bytearray(SNAPSHOT_MAGIC)
    out += struct.pack("<Q", len(map))
    for key in sorted(map):
        for field in (key, map[key]):
            raw = field.encode()
            out += struct.pack("<I", len(raw))
            out += raw
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        end = self.at + n
        if end > len(self.data):
            raise KvError("corrupt kv snapshot: truncated")
        out = self.data[self.at:end]
        self.at = end
        return out

    def string(self) -> str:
        (length,) = struct.unpack("<I", self.take(4))
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise KvError("corrupt kv snapshot: field is not UTF-8") from None


def decode_snapshot(data: bytes) -> dict:
    """Decode the shared kv snapshot format, rejecting anything malformed
    with the same message, in the same order of checks, as the Rust kv."""
    reader = _Reader(bytes(data))
    if reader.take(4) != SNAPSHOT_MAGIC:
        raise KvError("not a kv snapshot: bad magic")
    (count,) = struct.unpack("<Q", reader.take(8))
    map = {}
    previous = None
    # A lying count cannot make this loop long: every pair takes at least 8
    # bytes, so a count larger than the data runs out as "truncated".
    for _ in range(count):
        key = reader.string()
        value = reader.string()
        if previous is not None and previous >= key:
            raise KvError("corrupt kv snapshot: keys not in ascending order")
        previous = key
        map[key] = value
    if reader.at != len(reader.data):
        raise KvError("corrupt kv snapshot: trailing bytes")
    return map
