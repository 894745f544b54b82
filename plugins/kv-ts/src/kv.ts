// kv: the sample key-value state machine, in TypeScript.
//
// A line-by-line port of the Rust kv (plugins/kv/src/lib.rs), and it must
// stay identical to it: same results, same error messages, same entry bytes
// from `encode`, same snapshot bytes. A cluster can hot-swap between the two.
//
// The command language:
//
// | command        | kind     | result                                        |
// |----------------|----------|-----------------------------------------------|
// | `set K V`      | proposal | `OK`                                          |
// | `del K`        | proposal | `1` if K existed, else `0`                    |
// | `incr K [BY]`  | proposal | the new integer (K absent counts as 0)        |
// | `append K V`   | proposal | `OK`; V joins the space-separated list at K   |
// | `get K`        | query    | the value, or `(nil)`                         |
// | `len`          | query    | the number of keys                            |
//
// Keys and values are UTF-8 words without whitespace. Integers are signed
// 64-bit (BigInt here). Entry bytes are the canonical command text: words
// joined by one space, `incr` always with its increment.
//
// This file is plain TypeScript: nothing here knows about the engine or the
// ABI (that is src/sdk/plugin.ts), so it runs under Node for tests.

import { type Plugin, type Result, type StateMachine, err, ok } from "./sdk/plugin.js";
import { checkedAddI64, parseI64 } from "./sdk/i64.js";
import { rustDebugStr } from "./sdk/rust-debug.js";
import { splitWhitespace } from "./sdk/text.js";
import {
  binaryToBytes,
  binaryToUtf8,
  bytesToBinary,
  compareUtf8,
  decodeUtf8,
  encodeUtf8,
  sortUtf8,
  utf8ToBinary,
} from "./sdk/utf8.js";

/** One parsed command. */
export type Command =
  | { verb: "set"; key: string; value: string }
  | { verb: "del"; key: string }
  | { verb: "incr"; key: string; by: bigint }
  | { verb: "append"; key: string; value: string }
  | { verb: "get"; key: string }
  | { verb: "len" };

/** Whether the command changes state (and so must go through the log). */
export function isProposal(command: Command): boolean {
  return command.verb !== "get" && command.verb !== "len";
}

/** The canonical text of the command: the entry bytes kv stores. */
export function canonical(command: Command): string {
  switch (command.verb) {
    case "set":
      return `set ${command.key} ${command.value}`;
    case "del":
      return `del ${command.key}`;
    case "incr":
      // BigInt's toString() prints like Rust's i64 Display: `-5`, `7`.
      return `incr ${command.key} ${command.by}`;
    case "append":
      return `append ${command.key} ${command.value}`;
    case "get":
      return `get ${command.key}`;
    case "len":
      return "len";
  }
}

const usage = (text: string) => err(`wrong number of arguments: usage: ${text}`);

/** Parse command text. Every error names what was wrong and what was expected. */
export function parse(text: string): Result<Command> {
  const words = splitWhitespace(text);
  if (words.length === 0) return err("empty command");
  const [verb, ...args] = words;
  switch (verb) {
    case "set":
      return args.length === 2 ? ok({ verb, key: args[0], value: args[1] }) : usage("set KEY VALUE");
    case "del":
      return args.length === 1 ? ok({ verb, key: args[0] }) : usage("del KEY");
    case "incr": {
      if (args.length === 1) return ok({ verb, key: args[0], by: 1n });
      if (args.length !== 2) return usage("incr KEY [BY]");
      const by = parseI64(args[1]);
      if (by === undefined) return err(`increment ${rustDebugStr(args[1])} is not an integer`);
      return ok({ verb, key: args[0], by });
    }
    case "append":
      return args.length === 2 ? ok({ verb, key: args[0], value: args[1] }) : usage("append KEY VALUE");
    case "get":
      return args.length === 1 ? ok({ verb, key: args[0] }) : usage("get KEY");
    case "len":
      return args.length === 0 ? ok({ verb }) : usage("len");
    default:
      return err(`unknown command ${rustDebugStr(verb)}: expected set, del, incr, append, get or len`);
  }
}

/** Parse entry or query bytes, which may be anything, even invalid UTF-8. */
function parseBytes(bytes: Uint8Array): Result<Command> {
  const text = decodeUtf8(bytes);
  if (text === undefined) return err("command is not UTF-8 text");
  return parse(text);
}

const text = (s: string): Result<Uint8Array> => ok(encodeUtf8(s));

/** The whole replicated state. */
export class Kv implements StateMachine {
  constructor(readonly map: Map<string, string> = new Map()) {}

  /** The value at `key`. */
  get(key: string): string | undefined {
    return this.map.get(key);
  }

  apply(_index: number, entry: Uint8Array): Result<Uint8Array> {
    const command = parseBytes(entry);
    if (!command.ok) return command;
    return this.execute(command.value);
  }

  query(request: Uint8Array): Result<Uint8Array> {
    const command = parseBytes(request);
    if (!command.ok) return command;
    return this.read(command.value);
  }

  snapshot(): Result<Uint8Array> {
    return ok(encodeSnapshot(this.map));
  }

  /** Run a proposal. Computes the result first and mutates last, so an error
   * leaves the state untouched. */
  private execute(command: Command): Result<Uint8Array> {
    const map = this.map;
    switch (command.verb) {
      case "set":
        map.set(command.key, command.value);
        return text("OK");
      case "del":
        return text(map.delete(command.key) ? "1" : "0");
      case "incr": {
        const { key, by } = command;
        const old = map.get(key);
        const current = old === undefined ? 0n : parseI64(old);
        if (current === undefined) return err(`value of ${rustDebugStr(key)} is not an integer`);
        const next = checkedAddI64(current, by);
        if (next === undefined) return err(`incr would overflow the value of ${rustDebugStr(key)}`);
        map.set(key, next.toString());
        return text(next.toString());
      }
      case "append": {
        const old = map.get(command.key);
        map.set(command.key, old === undefined ? command.value : `${old} ${command.value}`);
        return text("OK");
      }
      case "get":
      case "len":
        return err(`${rustDebugStr(canonical(command))} is a query, not a proposal: use \`query\``);
    }
  }

  private read(command: Command): Result<Uint8Array> {
    switch (command.verb) {
      case "get":
        return text(this.map.get(command.key) ?? "(nil)");
      case "len":
        return text(String(this.map.size));
      default:
        return err(
          `${rustDebugStr(canonical(command))} changes state, so it is a proposal, not a query: use \`propose\``,
        );
    }
  }
}

// ---------------------------------------------------------------------------
// The snapshot format, shared by kv in every language (plugins/kv/README.md):
//
//   magic   4 bytes   "RKV1"
//   count   u64 LE    number of pairs
//   pairs   count x { key_len u32 LE, key (UTF-8), value_len u32 LE, value (UTF-8) }
//
// Pairs sorted by key bytes, ascending, no duplicates, nothing after the last.

const MAGIC = "RKV1";

/** `n` as 4 (u32 LE) or 8 (u64 LE) bytes of a binary string. */
function u32le(n: number): string {
  return String.fromCharCode(n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, n >>> 24);
}
function u64le(n: number): string {
  return u32le(n % 2 ** 32) + u32le(Math.floor(n / 2 ** 32));
}

/** Encode the state in the shared kv snapshot format. */
export function encodeSnapshot(map: Map<string, string>): Uint8Array {
  // The snapshot is built as one binary string (see sdk/utf8.ts) and turned
  // into bytes at the end: cheaper in fuel than writing byte by byte.
  // Keys are sorted by UTF-8 bytes, not by JavaScript's UTF-16 order.
  const keys = sortUtf8([...map.keys()]);
  const parts: string[] = [MAGIC, u64le(keys.length)];
  for (const key of keys) {
    for (const field of [utf8ToBinary(key), utf8ToBinary(map.get(key) as string)]) {
      parts.push(u32le(field.length), field);
    }
  }
  return binaryToBytes(parts.join(""));
}

/** Decode the shared kv snapshot format, rejecting anything malformed. */
export function decodeSnapshot(bytes: Uint8Array): Result<Map<string, string>> {
  const reader = new Reader(bytesToBinary(bytes));
  const magic = reader.take(4);
  if (!magic.ok) return magic;
  if (magic.value !== MAGIC) return err("not a kv snapshot: bad magic");
  const countLow = reader.u32();
  if (!countLow.ok) return countLow;
  const countHigh = reader.u32();
  if (!countHigh.ok) return countHigh;
  // Inexact past 2^53, but such a count is truncated long before it is reached.
  const count = countHigh.value * 2 ** 32 + countLow.value;
  const map = new Map<string, string>();
  let previous: string | undefined;
  for (let i = 0; i < count; i++) {
    const key = reader.field();
    if (!key.ok) return key;
    const value = reader.field();
    if (!value.ok) return value;
    if (previous !== undefined && compareUtf8(previous, key.value) >= 0) {
      return err("corrupt kv snapshot: keys not in ascending order");
    }
    previous = key.value;
    map.set(key.value, value.value);
  }
  if (!reader.atEnd()) return err("corrupt kv snapshot: trailing bytes");
  return ok(map);
}

/** Reads a snapshot held as a binary string (one code unit per byte). */
class Reader {
  private at = 0;
  constructor(private readonly bytes: string) {}

  atEnd(): boolean {
    return this.at === this.bytes.length;
  }

  take(n: number): Result<string> {
    const end = this.at + n;
    if (end > this.bytes.length) return err("corrupt kv snapshot: truncated");
    const out = this.bytes.slice(this.at, end);
    this.at = end;
    return ok(out);
  }

  u32(): Result<number> {
    const b = this.take(4);
    if (!b.ok) return b;
    const s = b.value;
    return ok((s.charCodeAt(0) | (s.charCodeAt(1) << 8) | (s.charCodeAt(2) << 16) | (s.charCodeAt(3) << 24)) >>> 0);
  }

  /** A u32 LE length, then that many bytes of UTF-8. */
  field(): Result<string> {
    const len = this.u32();
    if (!len.ok) return len;
    const raw = this.take(len.value);
    if (!raw.ok) return raw;
    const text = binaryToUtf8(raw.value);
    if (text === undefined) return err("corrupt kv snapshot: field is not UTF-8");
    return ok(text);
  }
}

/** The kv plugin: its initial state, restore and codec. */
export const kvPlugin: Plugin<Kv> = {
  init: () => new Kv(),

  restore(snapshot: Uint8Array): Result<Kv> {
    const map = decodeSnapshot(snapshot);
    return map.ok ? ok(new Kv(map.value)) : map;
  },

  encode(text: string): Result<Uint8Array> {
    const command = parse(text);
    return command.ok ? ok(encodeUtf8(canonical(command.value))) : command;
  },

  // decode and render: the defaults (UTF-8 text, errors "entry is not UTF-8
  // text" and "response is not UTF-8 text"), as in the Rust kv.
};
