// Unit tests of the kv logic under Node (`npm test`), through the same
// export glue the component uses. They check the TypeScript against the
// shared cases and against outputs of the Rust kv; the component itself is
// checked by plugins/conformance.sh.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

// QuickJS has Uint8Array.fromBase64 and .toBase64 (ES2026); Node 20 does not.
if (typeof Uint8Array.fromBase64 !== "function") {
  Uint8Array.fromBase64 = (s) => new Uint8Array(Buffer.from(s, "base64"));
  Uint8Array.prototype.toBase64 = function () {
    return Buffer.from(this.buffer, this.byteOffset, this.length).toString("base64");
  };
}

const { decodeSnapshot, encodeSnapshot, kvPlugin } = await import("../dist/kv.js");
const { exportPlugin } = await import("../dist/sdk/plugin.js");
const { rustDebugStr } = await import("../dist/sdk/rust-debug.js");
const { splitWhitespace } = await import("../dist/sdk/text.js");
const { compareUtf8, decodeUtf8, encodeUtf8, sortUtf8 } = await import("../dist/sdk/utf8.js");
const { parseI64 } = await import("../dist/sdk/i64.js");

const fresh = () => exportPlugin(kvPlugin);

// ABI 0.2.0 streams snapshots: read one in pieces of `max` bytes, and
// restore one in pieces of `piece` bytes, as the host does.
function snapshotOf(stateMachine, max = 7) {
  stateMachine.snapshotBegin();
  const pieces = [];
  for (;;) {
    const chunk = stateMachine.snapshotNext(max);
    if (chunk.length === 0) break;
    assert.ok(chunk.length <= max);
    pieces.push(...chunk);
  }
  return new Uint8Array(pieces);
}

function restoreInto(stateMachine, snapshot, piece = 5) {
  stateMachine.restoreBegin();
  for (let at = 0; at < snapshot.length; at += piece) {
    stateMachine.restoreChunk(snapshot.slice(at, at + piece));
  }
  return stateMachine.restoreFinish();
}
const bytes = (s) => new Uint8Array(Buffer.from(s, "utf8"));
const hex = (b) => Buffer.from(b).toString("hex");

/** Run a call of the exported glue: `err` comes back as a thrown string. */
function outcome(f) {
  try {
    return f();
  } catch (e) {
    if (typeof e !== "string") throw e;
    return `err: ${e}`;
  }
}

/** `\xNN` escapes to bytes, the rest as UTF-8 (the kv.cases raw-* syntax). */
function rawBytes(text) {
  const out = [];
  for (let i = 0; i < text.length; ) {
    if (text.startsWith("\\x", i)) {
      out.push(parseInt(text.slice(i + 2, i + 4), 16));
      i += 4;
    } else {
      const cp = text.codePointAt(i);
      const ch = String.fromCodePoint(cp);
      out.push(...Buffer.from(ch, "utf8"));
      i += ch.length;
    }
  }
  return new Uint8Array(out);
}

test("tests/conformance/kv.cases, every line including raw-*", () => {
  const cases = readFileSync(new URL("../../../tests/conformance/kv.cases", import.meta.url), "utf8");
  const { stateMachine, codec } = fresh();
  let index = 0;
  let checked = 0;
  for (const line of cases.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const kind = line.slice(0, line.indexOf(" "));
    const rest = line.slice(kind.length + 1);
    const arrow = rest.lastIndexOf(" => ");
    const command = rest.slice(0, arrow);
    const expected = rest.slice(arrow + 4);
    const got = outcome(() => {
      const entry = kind.startsWith("raw-") ? rawBytes(command) : codec.encode(command);
      const response = kind.endsWith("propose") ? stateMachine.apply(++index, entry) : stateMachine.query(entry);
      return codec.render(response);
    });
    assert.equal(got, expected, line);
    checked++;
  }
  assert.ok(checked > 60, `only ${checked} cases`);
});

test("encode produces canonical text", () => {
  const { codec } = fresh();
  const enc = (t) => outcome(() => Buffer.from(codec.encode(t)).toString("utf8"));
  assert.equal(enc("  set   a  1 "), "set a 1");
  assert.equal(enc("incr n"), "incr n 1");
  assert.equal(enc("incr k +5"), "incr k 5");
  assert.equal(enc("incr k 007"), "incr k 7");
  assert.equal(enc("incr k -0"), "incr k 0");
  assert.equal(enc("incr k -000"), "incr k 0");
  assert.equal(enc("incr k +-1"), 'err: increment "+-1" is not an integer');
  assert.equal(enc("incr k 1e3"), 'err: increment "1e3" is not an integer');
  assert.equal(enc("incr k ١"), 'err: increment "١" is not an integer'); // Arabic-Indic digit one
  assert.equal(enc("incr k -9223372036854775808"), "incr k -9223372036854775808");
  assert.equal(enc("incr k -9223372036854775809"), 'err: increment "-9223372036854775809" is not an integer');
  assert.equal(enc("incr k 000000000000000000000000000009"), "incr k 9");
  assert.equal(enc("get\u3000a\u0085"), "get a"); // Rust whitespace
  assert.equal(enc("get a\ufeff"), "get a\ufeff"); // U+FEFF is not whitespace in Rust
  assert.equal(enc("len"), "len");
  assert.equal(outcome(() => codec.decode(bytes("set a 1"))), "set a 1");
  assert.equal(outcome(() => codec.decode(new Uint8Array([0xff]))), "err: entry is not UTF-8 text");
  assert.equal(outcome(() => codec.render(new Uint8Array([0xc3]))), "err: response is not UTF-8 text");
});

test("error messages quote words as Rust's {:?} does", () => {
  // Expected values printed by Rust (format!("{:?}", s)).
  assert.equal(rustDebugStr("frob"), '"frob"');
  assert.equal(rustDebugStr('a"b\\c'), '"a\\"b\\\\c"');
  assert.equal(rustDebugStr("it's"), `"it's"`);
  assert.equal(rustDebugStr("\0\x01\x7f"), '"\\0\\u{1}\\u{7f}"');
  assert.equal(rustDebugStr("e\u0301"), '"e\\u{301}"'); // combining acute accent
  assert.equal(rustDebugStr("\u200b\u00ad"), '"\\u{200b}\\u{ad}"');
  assert.equal(rustDebugStr("ключ🔑\ufeff"), '"ключ🔑\\u{feff}"');
  assert.equal(rustDebugStr("\u{e0001}\u{10ffff}"), '"\\u{e0001}\\u{10ffff}"');
  const { codec } = fresh();
  assert.equal(
    outcome(() => codec.encode('fr"o\\b')),
    'err: unknown command "fr\\"o\\\\b": expected set, del, incr, append, get or len',
  );
});

test("splitWhitespace is Rust's split_whitespace", () => {
  assert.deepEqual(splitWhitespace(""), []);
  assert.deepEqual(splitWhitespace(" \t\n "), []);
  assert.deepEqual(splitWhitespace("\u2028a\u00a0\u00a0b\u205f"), ["a", "b"]);
  assert.deepEqual(splitWhitespace("a\u200bb\u180ec"), ["a\u200bb\u180ec"]);
});

test("parseI64 is Rust's str::parse::<i64>", () => {
  assert.equal(parseI64("9223372036854775807"), 9223372036854775807n);
  assert.equal(parseI64("9223372036854775808"), undefined);
  assert.equal(parseI64("-9223372036854775808"), -9223372036854775808n);
  for (const bad of ["", "+", "-", " 1", "1 ", "1_0", "0x1", "1.0", "--1", "١"]) {
    assert.equal(parseI64(bad), undefined, bad);
  }
});

test("UTF-8 decoding is as strict as Rust's from_utf8", () => {
  const valid = [[], [0x61], [0xc3, 0xa9], [0xe2, 0x82, 0xac], [0xf0, 0x9f, 0x94, 0x91], [0xef, 0xbf, 0xbf], [0xf4, 0x8f, 0xbf, 0xbf]];
  const invalid = [
    [0x80], [0xbf], [0xc0, 0x80], [0xc1, 0xbf], [0xc3], [0xe2, 0x82], [0xe0, 0x80, 0x80], [0xe0, 0x9f, 0xbf],
    [0xed, 0xa0, 0x80], [0xed, 0xbf, 0xbf], [0xf0, 0x80, 0x80, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xf5, 0x80, 0x80, 0x80],
    [0xf8, 0x88, 0x80, 0x80, 0x80], [0xfe], [0xff], [0x61, 0xc3, 0x28], [0xf0, 0x9f, 0x94],
  ];
  for (const v of valid) {
    const b = new Uint8Array(v);
    assert.equal(decodeUtf8(b), new TextDecoder("utf-8", { fatal: true }).decode(b), hex(b));
  }
  for (const v of invalid) assert.equal(decodeUtf8(new Uint8Array(v)), undefined, hex(v));
  // Every byte value, and a large input (chunked conversion).
  const all = new Uint8Array(256).map((_, i) => i);
  assert.equal(decodeUtf8(all), undefined);
  const big = "ключ🔑%25 ".repeat(20000);
  assert.equal(decodeUtf8(bytes(big)), big);
  assert.equal(hex(encodeUtf8(big)), hex(bytes(big)));
});

test("keys sort by UTF-8 bytes, not UTF-16 code units", () => {
  const keys = ["\u{1F511}", "\uFFFD", "a", "\uE000", "\u{10000}", "é", ""];
  const byBytes = [...keys].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  assert.deepEqual([...keys].sort(compareUtf8), byBytes);
  assert.deepEqual(sortUtf8([...keys]), byBytes);
  const noSurrogates = keys.filter((k) => k.length < 2);
  assert.deepEqual(sortUtf8([...noSurrogates]), noSurrogates.sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b))));
  assert.notDeepEqual([...keys].sort(), byBytes); // what a plain sort would get wrong
});

test("snapshot bytes match the Rust kv's", () => {
  // From the Rust kv (plugins/kv): set b 2, set a 1, set 🔑 🦀, set \u{fffd} x.
  const map = new Map([["b", "2"], ["a", "1"], ["🔑", "🦀"], ["\ufffd", "x"]]);
  assert.equal(
    hex(encodeSnapshot(map)),
    "524b5631" + "0400000000000000" +
      "01000000" + "61" + "01000000" + "31" +
      "01000000" + "62" + "01000000" + "32" +
      "03000000" + "efbfbd" + "01000000" + "78" +
      "04000000" + "f09f9491" + "04000000" + "f09fa680",
  );
  assert.equal(hex(encodeSnapshot(new Map())), "524b56310000000000000000");
});

test("snapshot round-trips and restore rejects corruption", () => {
  const { stateMachine, codec } = fresh();
  for (let i = 0; i < 100; i++) stateMachine.apply(i + 1, codec.encode(`set k${i} v${i}`));
  const snap = snapshotOf(stateMachine);
  const restored = fresh();
  restoreInto(restored.stateMachine, snap);
  assert.equal(hex(snapshotOf(restored.stateMachine)), hex(snap));
  assert.equal(Buffer.from(restored.stateMachine.query(bytes("get k42"))).toString(), "v42");

  const restore = (b) => outcome(() => restoreInto(fresh().stateMachine, new Uint8Array(b)));
  const pair = (k, v) => [...u32(k.length), ...k, ...u32(v.length), ...v];
  const u32 = (n) => [n & 255, (n >> 8) & 255, (n >> 16) & 255, n >>> 24];
  const head = (n) => [0x52, 0x4b, 0x56, 0x31, n, 0, 0, 0, 0, 0, 0, 0];
  assert.equal(restore([...snap.slice(0, -1)]), "err: corrupt kv snapshot: truncated");
  assert.equal(restore([...snap, 0]), "err: corrupt kv snapshot: trailing bytes");
  assert.equal(restore([0x58, 0x58, 0x58, 0x58]), "err: not a kv snapshot: bad magic");
  assert.equal(restore([0x52, 0x4b]), "err: corrupt kv snapshot: truncated");
  assert.equal(restore([...head(0)].slice(0, 11)), "err: corrupt kv snapshot: truncated");
  assert.equal(restore([...head(0)]), undefined);
  assert.equal(restore([...head(1), ...pair([0xff], [0x61])]), "err: corrupt kv snapshot: field is not UTF-8");
  assert.equal(restore([...head(1), ...pair([0x61], [0xc3])]), "err: corrupt kv snapshot: field is not UTF-8");
  assert.equal(restore([...head(2), ...pair([0x62], []), ...pair([0x61], [])]), "err: corrupt kv snapshot: keys not in ascending order");
  assert.equal(restore([...head(2), ...pair([0x61], []), ...pair([0x61], [])]), "err: corrupt kv snapshot: keys not in ascending order");
  // Ascending by bytes: U+FFFD (ef bf bd) before U+1F511 (f0 ...), even though UTF-16 orders them the other way.
  assert.equal(restore([...head(2), ...pair([0xef, 0xbf, 0xbd], []), ...pair([0xf0, 0x9f, 0x94, 0x91], [])]), undefined);
  assert.equal(restore([...head(2), ...pair([0xf0, 0x9f, 0x94, 0x91], []), ...pair([0xef, 0xbf, 0xbd], [])]), "err: corrupt kv snapshot: keys not in ascending order");
  // A huge count with no pairs is truncation, not an allocation.
  assert.equal(restore([0x52, 0x4b, 0x56, 0x31, 255, 255, 255, 255, 255, 255, 255, 255]), "err: corrupt kv snapshot: truncated");
  assert.deepEqual(decodeSnapshot(encodeSnapshot(new Map([["x", ""]]))), { ok: true, value: new Map([["x", ""]]) });
});

test("bad input changes nothing, and a failed restore keeps the state", () => {
  const { stateMachine, codec } = fresh();
  stateMachine.apply(1, codec.encode("set word hello"));
  const before = hex(snapshotOf(stateMachine));
  for (const bad of [bytes(""), bytes("frob a"), bytes("set a"), bytes("incr word"), new Uint8Array([0xff, 0xfe]), bytes("get word")]) {
    assert.match(outcome(() => stateMachine.apply(2, bad)), /^err: /);
  }
  assert.match(outcome(() => restoreInto(stateMachine, bytes("XXXX"))), /^err: /);
  assert.equal(hex(snapshotOf(stateMachine)), before);
});
