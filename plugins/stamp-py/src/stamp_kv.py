"""StampKv: kv plus `stamp K`, a proposal that reads the clock and randomness.

Plain Python, testable without WebAssembly (tests/test_stamp.py); stamp.py
wires it to the component's exports. See README.md for why `apply` reseeds
`random` first.
"""

import os
import random
import time

import kv


class StampKv(kv.Kv):
    """kv with one more proposal, `stamp K`."""

    def parse_words(self, words: list) -> tuple:
        if words and words[0] == "stamp":
            if len(words) != 2:
                raise kv.usage_error("stamp KEY")
            return ("stamp", words[1])
        # Everything else, errors included, is kv's: kv's message for an
        # unknown command does not list `stamp`, so that stamp-py passes the
        # shared kv conformance cases word for word.
        return super().parse_words(words)

    def apply(self, index: int, entry: bytes) -> bytes:
        # THE RULE: a generator whose state lives in the instance must be
        # reseeded at the start of every apply from a source the host resets
        # per call. os.urandom is such a source: the host derives it from the
        # log index. Without this line, random.random() would continue from
        # wherever this instance's generator happens to be, and a replica that
        # restarted from a snapshot (fresh instance, generator back at its
        # build-time state) would store different values than one that ran
        # all along.
        random.seed(os.urandom(32))
        return super().apply(index, entry)

    def execute(self, index: int, command: tuple) -> str:
        if command[0] != "stamp":
            return super().execute(index, command)
        _, key = command
        value = ":".join(
            [
                str(time.time_ns()),  # wall clock: the host's, for this index
                str(time.monotonic_ns()),  # monotonic clock: likewise
                repr(random.random()),  # instance PRNG, reseeded in apply
                os.urandom(8).hex(),  # the host's random stream for this index
            ]
        )
        self.map[key] = value
        return "OK"

