#!/usr/bin/env python3
"""What a durable commit costs on this disk (issue 14): one fdatasync per
commit, as a write-ahead log does (etcd's WAL), against the two of an LMDB
commit (its data pages, a sync, its meta page, a sync). One follower's
commit sits on every write's path, so the difference is latency a single
client pays on each write.

    host/benches/fsync_probe.py [DIR]      # DIR: where the data dirs live (default /tmp)
"""
import os
import sys
import tempfile
import time

ROUNDS = 1000
PAGE = 4096


def commit_times(fd, syncs):
    times = []
    for i in range(ROUNDS):
        started = time.perf_counter()
        os.pwrite(fd, os.urandom(PAGE), (i % 64) * PAGE)
        os.fdatasync(fd)
        if syncs == 2:
            os.pwrite(fd, os.urandom(PAGE), 65 * PAGE)
            os.fdatasync(fd)
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6


def main():
    where = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    with tempfile.NamedTemporaryFile(dir=where) as probe:
        fd = probe.fileno()
        os.pwrite(fd, b"\0" * (66 * PAGE), 0)
        os.fsync(fd)
        for syncs, name in ((1, "one fdatasync (a WAL)"), (2, "two fdatasyncs (an LMDB commit)")):
            median, p99 = commit_times(fd, syncs)
            print(f"{name:32} median {median:6.0f} us   p99 {p99:6.0f} us")


if __name__ == "__main__":
    main()
