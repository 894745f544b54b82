"""Random operations for the differential test (see run.sh).

    python3 gen_ops.py SEED COUNT > ops.txt

Mostly commands built from words chosen to hit the edges: Unicode keys,
control characters, combining marks, private-use and unassigned code points
(Rust's {:?} escapes those), every kind of Unicode whitespace between words,
integers at and beyond the i64 limits, non-integers that C's strtoll would
accept; some with bytes that break UTF-8; now and then a snapshot, and a
restore of a hand-made (sometimes corrupted) snapshot.
"""
import random
import struct
import sys

VERBS = ["set", "del", "incr", "append", "get", "len", "SET", "frob", "incr", "set", "get",
         "append", "", "lën", "get\u0301"]
KEYS = ["a", "b", "c", "ключ", "🔑", "a\x01", "q\u0301", "\u200b", "\ue000", '"', "\\", "k\x00",
        "x'y", "\u00ad", "\u0378", "\U0010ffff", "é", "\u180e", "\x7f", "\x1b[0m", "\u0600",
        "\U000e0001", "\ufeff", "\ud7ff", "\U0001f3fb", "n", "big", "small", "l", "\u0300",
        "\u0903", "\u1160"]
NUMBERS = ["1", "-1", "+5", "007", "9223372036854775807", "-9223372036854775808",
           "9223372036854775808", "-", "+", "1.5", "0x10", "\u0661", "+-1", "-0",
           "00000000000000000000001", "-9223372036854775809", "42", "1_0"]
SEPARATORS = [" ", " ", "  ", "\t", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\r\n",
              "\u0085", "\u1680", "\u205f"]


def word():
    r = random.random()
    if r < 0.5:
        return random.choice(KEYS)
    if r < 0.8:
        return random.choice(NUMBERS)
    return random.choice(KEYS) + random.choice(NUMBERS)


def command_text():
    words = [random.choice(VERBS)] + [word() for _ in range(random.choice([0, 1, 2, 2, 3, 3, 3, 4, 5]))]
    if random.random() < 0.1:
        words = words[1:]
    text = random.choice(SEPARATORS) if random.random() < 0.2 else ""
    text += random.choice(SEPARATORS).join(words)
    if random.random() < 0.2:
        text += random.choice(SEPARATORS)
    return text.encode()


def mangle(data):
    data = bytearray(data)
    for _ in range(random.randint(1, 3)):
        if not data:
            break
        r = random.random()
        if r < 0.4:
            data.insert(random.randrange(len(data) + 1),
                        random.choice([0x80, 0xFF, 0xC3, 0xE2, 0xED, 0xF0, 0xF4, 0xF5, 0xC0]))
        elif r < 0.7:
            data[random.randrange(len(data))] = random.randrange(256)
        else:
            del data[random.randrange(len(data))]
    return bytes(data)


def snapshot_bytes():
    pairs = {}
    for _ in range(random.randint(0, 6)):
        pairs[random.choice(KEYS).encode()] = random.choice(KEYS + NUMBERS).encode()
    items = sorted(pairs.items())
    if random.random() < 0.15 and len(items) > 1:
        random.shuffle(items)
    if random.random() < 0.1 and items:
        items.append(items[-1])
    data = b"RKV1" + struct.pack("<Q", len(items))
    for k, v in items:
        data += struct.pack("<I", len(k)) + k + struct.pack("<I", len(v)) + v
    r = random.random()
    if r < 0.1:
        data = data[:random.randrange(len(data) + 1)]
    elif r < 0.2:
        data += bytes([random.randrange(256)])
    elif r < 0.35:
        data = mangle(data)
    return data


def main():
    random.seed(int(sys.argv[1]))
    out = sys.stdout
    for _ in range(int(sys.argv[2])):
        r = random.random()
        if r < 0.02:
            out.write("snapshot\n")
            continue
        if r < 0.03:
            out.write("restore " + snapshot_bytes().hex() + "\n")
            continue
        text = command_text()
        if r < 0.06:
            text = mangle(text)
        op = random.choices(["encode", "apply", "query", "decode", "render"], [3, 6, 3, 1, 1])[0]
        out.write(op + " " + text.hex() + "\n")


main()
