"""Unit tests of stamp-py's pure logic: plain CPython, no WebAssembly.

    cd plugins/stamp-py && python3 -m unittest discover -s tests -v

A fake host stands in for raftify-host's WASI shim: before each call it
resets the clock and the random stream from the log index, as the real one
does. With it, the tests show the rule of README.md: `random` must be
reseeded in every apply, or a replica rebuilt from a snapshot diverges.
"""

import hashlib
import os
import re
import sys
import unittest
from unittest import mock

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "kv-py", "src"))

import kv  # noqa: E402
from stamp_kv import StampKv  # noqa: E402

CASES = os.path.join(HERE, "..", "..", "..", "tests", "conformance", "kv.cases")


class FakeHost:
    """Clocks and randomness that depend only on the index of the call."""

    def __init__(self):
        self.index = 0

    def reseed(self, index):
        self.index, self.readings, self.counter = index, 0, 0

    def now(self):
        self.readings += 1
        return 1_704_067_200 * 10**9 + self.index * 10**6 + self.readings

    def urandom(self, n):
        out = b""
        while len(out) < n:
            self.counter += 1
            out += hashlib.sha256(b"%d:%d" % (self.index, self.counter)).digest()
        return out[:n]

    def apply(self, machine, index, text):
        self.reseed(index)
        with mock.patch("os.urandom", self.urandom), mock.patch("time.time_ns", self.now), \
                mock.patch("time.monotonic_ns", self.now):
            return machine.apply(index, text.encode()).decode()


class NoReseed(StampKv):
    """stamp-py without the rule, for contrast."""

    def apply(self, index, entry):
        return kv.Kv.apply(self, index, entry)


class Stamp(unittest.TestCase):
    def test_stamp_stores_four_fields(self):
        host, m = FakeHost(), StampKv()
        self.assertEqual(host.apply(m, 3, "stamp s"), "OK")
        wall, mono, rnd, hexed = m.map["s"].split(":")
        self.assertEqual(wall, "1704067200003000001")
        self.assertEqual(mono, "1704067200003000002")
        self.assertTrue(0 <= float(rnd) < 1)
        self.assertRegex(hexed, "^[0-9a-f]{16}$")

    def test_stamp_is_a_proposal_with_one_key(self):
        m = StampKv()
        self.assertEqual(m.encode("  stamp   k "), b"stamp k")
        for bad in ["stamp", "stamp a b", "stamp a b c d e"]:
            with self.assertRaises(kv.KvError) as e:
                m.encode(bad)
            self.assertEqual(e.exception.message, "wrong number of arguments: usage: stamp KEY")
        with self.assertRaises(kv.KvError) as e:
            m.query(b"stamp k")
        self.assertIn("changes state", e.exception.message)

    def test_same_index_same_value_whatever_the_instance_did_before(self):
        host = FakeHost()
        long_running, restarted = StampKv(), StampKv()
        for i in range(1, 50):  # the long-running replica's history
            host.apply(long_running, i, f"stamp old{i}")
        restarted.restore(long_running.snapshot())  # rebuilt from a snapshot
        for i in range(50, 55):
            host.apply(long_running, i, f"stamp new{i}")
            host.apply(restarted, i, f"stamp new{i}")
        self.assertEqual(long_running.snapshot(), restarted.snapshot())

    def test_without_the_rule_a_restored_replica_diverges(self):
        host = FakeHost()
        long_running, restarted = NoReseed(), NoReseed()
        for i in range(1, 50):
            host.apply(long_running, i, f"stamp old{i}")
        restarted.restore(long_running.snapshot())
        import random
        random.seed(1)  # the fresh instance's generator: wherever it starts
        host.apply(restarted, 50, "stamp new")
        random.seed(2)
        host.apply(long_running, 50, "stamp new")
        self.assertNotEqual(long_running.map["new"], restarted.map["new"])


class KvLanguageStillHolds(unittest.TestCase):
    def test_kv_cases(self):
        m = StampKv()
        with open(CASES, encoding="utf-8") as cases:
            for line in cases:
                line = line.rstrip("\n")
                if not line or line.startswith("#"):
                    continue
                kind, rest = line.split(" ", 1)
                command, expected = rest.rsplit(" => ", 1)
                try:
                    if kind in ("propose", "query"):
                        entry = m.encode(command)
                    else:
                        entry = re.sub(rb"\\x([0-9a-fA-F]{2})",
                                       lambda x: bytes([int(x.group(1), 16)]), command.encode())
                    out = m.apply(1, entry) if kind.endswith("propose") else m.query(entry)
                    got = m.render(out)
                except kv.KvError as error:
                    got = "err: " + error.message
                self.assertEqual(got, expected, line)


if __name__ == "__main__":
    unittest.main()
