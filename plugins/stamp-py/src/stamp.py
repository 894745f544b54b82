"""stamp-py: kv plus `stamp K`, a proposal that reads the clock and randomness.

A demonstration that a plugin may call `time.time_ns()`, `os.urandom()` or
`random.random()` in `apply` and still keep every replica identical, because
raftify-host serves these through its deterministic WASI shim: before every
call it resets the clocks and the random stream from the log index being
applied. The one thing the host cannot reset is state kept *inside* the
instance, such as the Mersenne Twister behind Python's `random` module. See
README.md for the rule this file follows.

    stamp K    proposal   OK; stores at K "WALL_NS:MONO_NS:RANDOM:URANDOM_HEX"

Everything else is kv-py's language and behavior, reused from
plugins/kv-py/src (build.sh puts it on the Python path), not copied.
"""

import app
from stamp_kv import StampKv

# componentize-py looks the export classes up in this module: re-export
# kv-py's, unchanged. They serve whatever state machine `app.use` installs.
from app import Codec, StateMachine  # noqa: F401

app.use(StampKv())
