"""The component's entry point: wires `kv.Kv` to the raftify:fsm exports.

componentize-py builds the component from this module (`componentize-py
componentize app`). For every interface the world exports it looks up a
class of the same name here: `StateMachine` for `state-machine` and `Codec`
for `codec`. Their methods are the WIT functions in snake_case, with
`list<u8>` as `bytes` and `u64` and `u32` as `int`. The world is
`raftify:fsm/plugin@0.2.0` (wit/0.2.0/fsm.wit): snapshots cross the boundary
in chunks. `kv.Kv` still makes and reads its whole snapshot; the methods
below hand it out, and collect it, a chunk at a time. A WIT `result<T, string>` is the return value on success;
to return `err`, raise `componentize_py_types.Err(message)`.

Anything else that escapes a method (a bug: KeyError, AssertionError, ...)
is an uncaught exception, which traps. The host then throws the instance
away and rebuilds it at the state before the call, so a bug never leaves a
half-applied entry behind; but expected errors must be `Err`, never a trap.

Copy this file as is for a new plugin and swap `kv.Kv` for your class.
"""

from componentize_py_types import Err
from wit_world import exports

import kv

# The one state machine of this instance. The host runs one instance per
# replica and calls it one call at a time, so a module global is the state.
# componentize-py runs this module at build time and snapshots the memory, so
# the component starts with it already initialized.
machine = kv.Kv()


# A snapshot being read, and a restore being collected.
outgoing: bytes | None = None
outgoing_at = 0
incoming: list[bytes] | None = None


def use(new_machine: kv.Kv) -> None:
    """Serve another state machine (a kv.Kv subclass) through these exports.

    For plugins that extend kv from their own module: call it at import time,
    then re-export `StateMachine` and `Codec` (see plugins/stamp-py).
    """
    global machine
    machine = new_machine


class StateMachine(exports.StateMachine):
    """The `state-machine` interface: kv's `KvError` becomes WIT `err`."""

    def apply(self, index: int, entry: bytes) -> bytes:
        try:
            return machine.apply(index, entry)
        except kv.KvError as error:
            raise Err(error.message) from None

    def query(self, request: bytes) -> bytes:
        try:
            return machine.query(request)
        except kv.KvError as error:
            raise Err(error.message) from None

    def snapshot_begin(self) -> None:
        # The whole snapshot now, so entries applied while the host reads
        # the chunks do not show in them.
        global outgoing, outgoing_at
        outgoing = machine.snapshot()
        outgoing_at = 0

    def snapshot_next(self, max_bytes: int) -> bytes:
        global outgoing, outgoing_at
        if outgoing is None:
            return b""
        end = min(len(outgoing), outgoing_at + max(1, max_bytes))
        chunk = outgoing[outgoing_at:end]
        outgoing_at = end
        if end >= len(outgoing):
            outgoing = None
        return chunk

    def restore_begin(self) -> None:
        global incoming
        incoming = []

    def restore_chunk(self, chunk: bytes) -> None:
        if incoming is None:
            raise Err("restore-chunk without restore-begin")
        incoming.append(bytes(chunk))

    def restore_finish(self) -> None:
        global incoming
        if incoming is None:
            raise Err("restore-finish without restore-begin")
        whole = b"".join(incoming)
        incoming = None
        try:
            machine.restore(whole)
        except kv.KvError as error:
            raise Err(error.message) from None


class Codec(exports.Codec):
    """The `codec` interface. Pure: it may run on a separate instance."""

    def encode(self, text: str) -> bytes:
        try:
            return machine.encode(text)
        except kv.KvError as error:
            raise Err(error.message) from None

    def decode(self, entry: bytes) -> str:
        try:
            return machine.decode(entry)
        except kv.KvError as error:
            raise Err(error.message) from None

    def render(self, response: bytes) -> str:
        try:
            return machine.render(response)
        except kv.KvError as error:
            raise Err(error.message) from None
