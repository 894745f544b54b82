// The engine binding: turns a plugin written against the `Plugin` interface
// below into the two objects the component exports, `stateMachine` and
// `codec`, in the shape componentize-qjs expects for the WIT world
// `raftify:fsm/plugin@0.2.0` (wit/0.2.0/fsm.wit): snapshots cross the
// boundary in chunks. The plugin still writes `snapshot()` and `restore()`
// for its whole state; this binding hands the bytes out, and collects them,
// a chunk at a time.
//
// This file is the only one that knows how componentize-qjs maps WIT to
// JavaScript. Your plugin's logic (src/kv.ts here) knows nothing about it, so
// it can be unit-tested under Node and would survive a change of engine.
//
// How componentize-qjs maps the WIT types used by the plugin world:
// - `list<u8>` arrives as a Uint8Array; a Uint8Array is returned for it;
// - `u64` (apply's index) arrives as a JavaScript number, exact up to 2^53;
//   `u32` (snapshot-next's max-bytes) as a number;
// - `result<T, string>`: return T for `ok`; throw a string for `err`;
// - `result<_, string>`: return nothing for `ok`;
// - interface `state-machine` is the export named `stateMachine`, and its
//   kebab-case functions are camelCase methods (`snapshot-next` ->
//   `snapshotNext`).
// And how it treats exceptions: a thrown string or Error becomes `err` (its
// message); a thrown anything else traps (wasm `unreachable`).

import { decodeUtf8 } from "./utf8.js";

/** Rust's `Result<T, String>`: either a value or an error message. */
export type Result<T> = { ok: true; value: T } | { ok: false; error: string };

/** `Ok(value)` */
export function ok<T>(value: T): Result<T> {
  return { ok: true, value };
}

/** `Err(message)` */
export function err(error: string): { ok: false; error: string } {
  return { ok: false, error };
}

/**
 * The state machine: one object per replica holding the whole state.
 *
 * Rules (the full contract is in wit/0.2.0/fsm.wit):
 * - deterministic: the same state and entry give the same result and next
 *   state on every machine. Do not let Math.random, Date or performance
 *   influence the state or the result (see README.md for what they do);
 * - an `err` from `apply` must leave the state exactly as it was: check
 *   everything first, mutate last;
 * - `query` and `snapshot` must not change the state;
 * - throwing is a panic: the call traps, the host throws the instance away
 *   and rebuilds the state as it was before the call. Return `err` for bad
 *   input instead; entries are untrusted bytes.
 */
export interface StateMachine {
  /** Apply one committed entry, at log index `index`. */
  apply(index: number, entry: Uint8Array): Result<Uint8Array>;
  /** Answer a read-only request. */
  query(request: Uint8Array): Result<Uint8Array>;
  /** Serialize the whole state, in a stable, documented format. */
  snapshot(): Result<Uint8Array>;
}

/** A plugin: how to make its state machine, and its codec. */
export interface Plugin<S extends StateMachine> {
  /** The state of a fresh replica. */
  init(): S;
  /**
   * A state from bytes made by `snapshot`, possibly by another version of
   * this plugin or by a plugin in another language.
   */
  restore(snapshot: Uint8Array): Result<S>;
  /** Command text (a proposal or a query) to entry or query bytes. Pure. */
  encode(text: string): Result<Uint8Array>;
  /** Entry bytes back to command text. Pure. Default: the bytes as UTF-8. */
  decode?(entry: Uint8Array): Result<string>;
  /** Response bytes to text. Pure. Default: the bytes as UTF-8. */
  render?(response: Uint8Array): Result<string>;
}

/** A thrown value that is neither a string nor an Error makes the call trap. */
function panic(cause: unknown): never {
  throw { panic: cause };
}

/** Run `f`; turn `err` into a thrown string and any exception into a trap. */
function call<T>(f: () => Result<T>, check: (value: T) => boolean): T {
  let result: Result<T>;
  try {
    result = f();
  } catch (e) {
    panic(e);
  }
  if (!result.ok) throw String(result.error);
  if (!check(result.value)) panic("plugin returned a value of the wrong type");
  return result.value;
}

const isBytes = (v: unknown): boolean => v instanceof Uint8Array;
const isString = (v: unknown): boolean => typeof v === "string";

function defaultDecode(entry: Uint8Array): Result<string> {
  const text = decodeUtf8(entry);
  return text === undefined ? err("entry is not UTF-8 text") : ok(text);
}

function defaultRender(response: Uint8Array): Result<string> {
  const text = decodeUtf8(response);
  return text === undefined ? err("response is not UTF-8 text") : ok(text);
}

/**
 * The component's exports for `plugin`. In the entry module:
 *
 *     const exports = exportPlugin(myPlugin);
 *     export const stateMachine = exports.stateMachine;
 *     export const codec = exports.codec;
 */
export function exportPlugin<S extends StateMachine>(plugin: Plugin<S>) {
  // The live state. Created at module initialization, which componentize-qjs
  // runs at build time: a fresh instance starts from this snapshot.
  let state: S = plugin.init();
  // A snapshot being read, and a restore being collected.
  let outgoing: Uint8Array | null = null;
  let outgoingAt = 0;
  let incoming: Uint8Array[] | null = null;
  const decode = plugin.decode ?? defaultDecode;
  const render = plugin.render ?? defaultRender;

  const stateMachine = {
    apply(index: number, entry: Uint8Array): Uint8Array {
      return call(() => state.apply(index, entry), isBytes);
    },
    query(request: Uint8Array): Uint8Array {
      return call(() => state.query(request), isBytes);
    },
    // A snapshot: `snapshot()` once at the begin, so entries applied while
    // the host reads the chunks do not show in them.
    snapshotBegin(): void {
      outgoing = call(() => state.snapshot(), isBytes);
      outgoingAt = 0;
    },
    snapshotNext(maxBytes: number): Uint8Array {
      if (outgoing === null) return new Uint8Array(0);
      const end = Math.min(outgoing.length, outgoingAt + Math.max(1, maxBytes));
      const chunk = outgoing.slice(outgoingAt, end);
      outgoingAt = end;
      if (outgoingAt >= outgoing.length) outgoing = null;
      return chunk;
    },
    // A restore: the chunks are collected, then `restore()` gets them whole.
    restoreBegin(): void {
      incoming = [];
    },
    restoreChunk(chunk: Uint8Array): void {
      if (incoming === null) throw "restore-chunk without restore-begin";
      incoming.push(chunk.slice());
    },
    restoreFinish(): void {
      if (incoming === null) throw "restore-finish without restore-begin";
      const pieces = incoming;
      incoming = null;
      const whole = new Uint8Array(pieces.reduce((n, p) => n + p.length, 0));
      let at = 0;
      for (const piece of pieces) {
        whole.set(piece, at);
        at += piece.length;
      }
      // The state is replaced only if restore succeeds.
      state = call(() => plugin.restore(whole), (s) => s !== undefined && s !== null);
    },
  };

  const codec = {
    encode(text: string): Uint8Array {
      return call(() => plugin.encode(text), isBytes);
    },
    decode(entry: Uint8Array): string {
      return call(() => decode(entry), isString);
    },
    render(response: Uint8Array): string {
      return call(() => render(response), isString);
    },
  };

  return { stateMachine, codec };
}
