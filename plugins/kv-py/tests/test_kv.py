"""Unit tests of kv-py's pure logic: plain CPython, no WebAssembly.

    cd plugins/kv-py && python3 -m unittest discover -s tests -v

They mirror plugins/kv/src/lib.rs's tests, run every line of
tests/conformance/kv.cases (raw-* lines included) through the same steps the
host takes, and pin the snapshot bytes the Rust kv produces.
"""

import os
import re
import struct
import sys
import unittest

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import kv  # noqa: E402
from rust_debug import debug_str  # noqa: E402

CASES = os.path.join(HERE, "..", "..", "..", "tests", "conformance", "kv.cases")


def outcome(call, *args):
    """A call's result as the host shows it: the text, or `err: MESSAGE`."""
    try:
        return call(*args)
    except kv.KvError as error:
        return "err: " + error.message


def run_case(machine, kind, command):
    """One kv.cases line, the way the host runs it."""
    if kind in ("propose", "query"):
        try:
            entry = machine.encode(command)
        except kv.KvError as error:
            return "err: " + error.message
    else:
        # raw-*: bytes straight to apply/query; \xNN escapes stand for bytes.
        entry = re.sub(
            rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), command.encode()
        )
    try:
        if kind.endswith("propose"):
            out = machine.apply(1, entry)
        else:
            out = machine.query(entry)
        return machine.render(out)
    except kv.KvError as error:
        return "err: " + error.message


def run(machine, text):
    """Encode, then apply or query, as the CLI does."""
    try:
        entry = machine.encode(text)
        command = machine.parse_bytes(entry)
        out = machine.apply(1, entry) if kv.is_proposal(command) else machine.query(entry)
        return out.decode()
    except kv.KvError as error:
        return "err: " + error.message


class ConformanceCases(unittest.TestCase):
    def test_every_line_of_kv_cases(self):
        machine = kv.Kv()
        checked = 0
        with open(CASES, encoding="utf-8") as cases:
            for line in cases:
                line = line.rstrip("\n")
                if not line or line.startswith("#"):
                    continue
                kind, rest = line.split(" ", 1)
                command, expected = rest.rsplit(" => ", 1)
                with self.subTest(line=line):
                    self.assertEqual(run_case(machine, kind, command), expected)
                checked += 1
        self.assertGreater(checked, 60)


class CommandLanguage(unittest.TestCase):
    def test_the_command_language_from_design_md(self):
        m = kv.Kv()
        self.assertEqual(run(m, "set a 1"), "OK")
        self.assertEqual(run(m, "get a"), "1")
        self.assertEqual(run(m, "get missing"), "(nil)")
        self.assertEqual(run(m, "incr a"), "2")
        self.assertEqual(run(m, "incr a 40"), "42")
        self.assertEqual(run(m, "incr fresh -3"), "-3")
        self.assertEqual(run(m, "append l x"), "OK")
        self.assertEqual(run(m, "append l y"), "OK")
        self.assertEqual(run(m, "get l"), "x y")
        self.assertEqual(run(m, "len"), "3")
        self.assertEqual(run(m, "del a"), "1")
        self.assertEqual(run(m, "del a"), "0")
        self.assertEqual(run(m, "len"), "2")

    def test_bad_input_is_an_error_and_changes_nothing(self):
        m = kv.Kv()
        run(m, "set word hello")
        before = dict(m.map)
        for bad in ["", "frob a", "set a", "set a b c", "incr a x", "get", "len x"]:
            self.assertTrue(run(m, bad).startswith("err: "), bad)
        self.assertIn("not an integer", run(m, "incr word"))
        run(m, "set big 9223372036854775807")
        self.assertIn("overflow", run(m, "incr big"))
        self.assertEqual(outcome(m.apply, 1, b"\xff\xfe"), "err: command is not UTF-8 text")
        self.assertIn("query", outcome(m.apply, 1, b"get word"))
        self.assertIn("proposal", outcome(m.query, b"set a 1"))
        del m.map["big"]
        self.assertEqual(m.map, before)

    def test_encode_produces_canonical_text(self):
        m = kv.Kv()
        self.assertEqual(m.encode("  set   a  1 "), b"set a 1")
        self.assertEqual(m.encode("incr n"), b"incr n 1")
        self.assertEqual(m.encode("incr k +5"), b"incr k 5")
        self.assertEqual(m.encode("incr k 007"), b"incr k 7")
        self.assertEqual(m.encode("incr k -0"), b"incr k 0")
        self.assertEqual(m.encode("\tget\u3000a\u2028"), b"get a")
        self.assertEqual(m.decode(b"set a 1"), "set a 1")
        self.assertEqual(outcome(m.decode, b"\xc3"), "err: entry is not UTF-8 text")
        self.assertEqual(outcome(m.render, b"\xc3"), "err: response is not UTF-8 text")

    def test_integers_parse_like_rust_i64(self):
        good = {"0": 0, "+5": 5, "-0": 0, "007": 7, "9223372036854775807": 2**63 - 1,
                "-9223372036854775808": -(2**63)}
        for text, value in good.items():
            self.assertEqual(kv.parse_i64(text), value, text)
        bad = ["", "+", "-", "--1", "+-1", "1_000", " 7", "7 ", "7\n", "1.5", "0x10",
               "\u0667", "\uff17", "9223372036854775808", "-9223372036854775809", "1e3"]
        for text in bad:
            self.assertIsNone(kv.parse_i64(text), repr(text))

    def test_words_split_like_rust_split_whitespace(self):
        # U+001C..U+001F are whitespace to Python's str.split(), not to Rust.
        self.assertEqual(kv.split_words("set a\x1cb c", 9), ["set", "a\x1cb", "c"])
        self.assertEqual(kv.split_words("\x85set\xa0a\u205fb\u3000", 9), ["set", "a", "b"])
        self.assertEqual(kv.split_words("   ", 9), [])
        # U+200B (zero width space) is not White_Space in either language.
        self.assertEqual(kv.split_words("a\u200bb", 9), ["a\u200bb"])
        # At most `limit` words, on both paths.
        self.assertEqual(kv.split_words(" a  b c d ", 2), ["a", "b"])
        self.assertEqual(kv.split_words(" a\x1c  b c d ", 2), ["a\x1c", "b"])
        self.assertEqual(kv.split_words("a b ", 3), ["a", "b"])

    def test_huge_commands_cost_little_and_match_rust(self):
        m = kv.Kv()
        self.assertEqual(m.encode("incr k " + "0" * 5000 + "7"), b"incr k 7")
        self.assertEqual(m.encode("incr k -" + "0" * 5000 + "9223372036854775808"),
                         b"incr k -9223372036854775808")
        self.assertEqual(outcome(m.encode, "incr k -" + "0" * 5000 + "9223372036854775809"),
                         "err: increment \"-" + "0" * 5000 + "9223372036854775809\" is not an integer")
        self.assertEqual(outcome(m.encode, "incr k " + "9" * 5000),
                         "err: increment \"" + "9" * 5000 + "\" is not an integer")
        self.assertEqual(outcome(m.encode, "set many " + "a " * 100000),
                         "err: wrong number of arguments: usage: set KEY VALUE")
        self.assertEqual(outcome(m.encode, "set many\x1c " + "a " * 100000),
                         "err: wrong number of arguments: usage: set KEY VALUE")
        run(m, "set n " + "0" * 5000 + "41")
        self.assertEqual(run(m, "incr n"), "42")


class RustDebug(unittest.TestCase):
    def test_matches_rust_debug_for_str(self):
        # Expected values printed by Rust 1.95's format!("{:?}", s).
        cases = {
            "frob": '"frob"',
            'a"b\\c': '"a\\"b\\\\c"',
            "it's": '"it\'s"',
            "\0\t\n\r": '"\\0\\t\\n\\r"',
            "\x1b\x7f": '"\\u{1b}\\u{7f}"',
            "a\u0301": '"a\\u{301}"',
            "\u200b\xad\xa0": '"\\u{200b}\\u{ad}\\u{a0}"',
            "\ue000": '"\\u{e000}"',
            "ключ🔑": '"ключ🔑"',
            "set a 1": '"set a 1"',
        }
        for text, expected in cases.items():
            self.assertEqual(debug_str(text), expected, repr(text))

    def test_error_messages_quote_like_rust(self):
        m = kv.Kv()
        self.assertEqual(
            outcome(m.encode, 'fr"ob'),
            'err: unknown command "fr\\"ob": expected set, del, incr, append, get or len',
        )
        self.assertEqual(outcome(m.encode, "incr k 1\x1f"),
                         'err: increment "1\\u{1f}" is not an integer')


class Snapshots(unittest.TestCase):
    def test_format_is_the_shared_kv_format(self):
        m = kv.Kv()
        for text in ["set b 2", "set a 1", "set ключ 🦀", "set z x"]:
            run(m, text)
        expected = b"RKV1" + struct.pack("<Q", 4)
        for k, v in [("a", "1"), ("b", "2"), ("z", "x"), ("ключ", "🦀")]:
            for field in (k.encode(), v.encode()):
                expected += struct.pack("<I", len(field)) + field
        self.assertEqual(m.snapshot(), expected)
        self.assertEqual(kv.Kv().snapshot(), b"RKV1" + bytes(8))

    def test_sorted_by_utf8_bytes(self):
        # Code point order is UTF-8 byte order; UTF-16 order would differ here.
        m = kv.Kv()
        for key in ["\U0001f511", "\uff21", "a", "\xe9", "B"]:
            m.map[key] = "v"
        keys = list(kv.decode_snapshot(m.snapshot()))
        self.assertEqual([k.encode() for k in keys], sorted(k.encode() for k in keys))

    def test_round_trips_and_rejects_corruption(self):
        m = kv.Kv()
        for i in range(100):
            run(m, f"set k{i} v{i}")
        snap = m.snapshot()
        restored = kv.Kv()
        restored.restore(snap)
        self.assertEqual(restored.map, m.map)
        self.assertEqual(restored.snapshot(), snap)

        def restore(data):
            fresh = kv.Kv()
            fresh.map = {"untouched": "yes"}
            result = outcome(fresh.restore, data)
            if result is not None:
                self.assertEqual(fresh.map, {"untouched": "yes"})
            return result

        truncated = "err: corrupt kv snapshot: truncated"
        self.assertEqual(restore(snap[:-1]), truncated)
        self.assertEqual(restore(b"RK"), truncated)
        self.assertEqual(restore(b"RKV1" + bytes(7)), truncated)
        self.assertEqual(restore(b"XXXX"), "err: not a kv snapshot: bad magic")
        self.assertEqual(restore(snap + b"\0"), "err: corrupt kv snapshot: trailing bytes")
        self.assertEqual(restore(b"RKV1" + struct.pack("<Q", 2**64 - 1)), truncated)

        def pairs(*fields, count=None):
            out = b"RKV1" + struct.pack("<Q", len(fields) // 2 if count is None else count)
            for field in fields:
                out += struct.pack("<I", len(field)) + field
            return out

        self.assertIsNone(restore(pairs(b"a", b"1", b"b", b"2")))
        self.assertEqual(restore(pairs(b"b", b"1", b"a", b"2")),
                         "err: corrupt kv snapshot: keys not in ascending order")
        self.assertEqual(restore(pairs(b"a", b"1", b"a", b"2")),
                         "err: corrupt kv snapshot: keys not in ascending order")
        self.assertEqual(restore(pairs(b"\xff", b"1")),
                         "err: corrupt kv snapshot: field is not UTF-8")
        self.assertEqual(restore(pairs(b"a", b"\xed\xa0\x80")),
                         "err: corrupt kv snapshot: field is not UTF-8")
        self.assertEqual(restore(pairs(b"a", b"1", count=2)), truncated)
        self.assertEqual(restore(pairs(b"a", b"1", count=0)),
                         "err: corrupt kv snapshot: trailing bytes")


if __name__ == "__main__":
    unittest.main()
