// UTF-8 and bytes helpers for plugins.
//
// The QuickJS engine inside the component has no TextEncoder or TextDecoder,
// and the WIT ABI hands a plugin raw bytes (`list<u8>` arrives as a
// Uint8Array) that may be any bytes at all. These helpers do what Rust's
// `str::as_bytes` and `std::str::from_utf8` do, with the same strictness.
//
// Why they look roundabout: the host meters every call in fuel (about one
// unit per Wasm instruction executed). Interpreted JavaScript costs well over
// a thousand fuel per loop iteration, so a loop over every byte of a large
// value would run out of fuel (codec calls get 200 fuel per input byte).
// Every per-byte pass here is a builtin that QuickJS implements in C (base64,
// `escape`/`decodeURIComponent`, regular expressions), at about 30 to 300
// fuel per byte. The fuel table in README.md has the measured costs.
//
// Many helpers work on "binary strings": strings with one code unit (0..255)
// per byte. Not text; a form that C builtins convert quickly to and from
// Uint8Array, and that can be sliced and concatenated cheaply.

// Uint8Array.fromBase64 and Uint8Array.prototype.toBase64 (ES2026) are built
// into QuickJS; TypeScript's ES2022 library does not declare them yet.
type Base64Constructor = { fromBase64(base64: string): Uint8Array };
type Base64Bytes = { toBase64(): string };
// atob and btoa are globals in QuickJS (and Node), declared by TypeScript's
// DOM library, which this project does not load.
declare function atob(base64: string): string;
declare function btoa(binary: string): string;

/** The bytes as a binary string. */
export function bytesToBinary(bytes: Uint8Array): string {
  return atob((bytes as unknown as Base64Bytes).toBase64());
}

/** A binary string (every code unit < 256) as bytes. */
export function binaryToBytes(binary: string): Uint8Array {
  return (Uint8Array as unknown as Base64Constructor).fromBase64(btoa(binary));
}

/** Whether every code unit of `s` is below 0x80. */
const ASCII = /^[\x00-\x7f]*$/;

/** Whether `s` is all ASCII (then its UTF-8 bytes are its code units). */
export function isAscii(s: string): boolean {
  return ASCII.test(s);
}

/** The UTF-8 bytes of `text`, as a binary string. `text` must be
 * well-formed (no lone surrogates); WIT strings always are. */
export function utf8ToBinary(text: string): string {
  // encodeURIComponent writes each UTF-8 byte of a non-ASCII character as
  // %XX, which unescape turns into one code unit per byte.
  return ASCII.test(text) ? text : unescape(encodeURIComponent(text));
}

/**
 * Decode a binary string as UTF-8, strictly: `undefined` for anything Rust's
 * `from_utf8` rejects (bad or truncated sequences, overlong forms,
 * surrogates, code points past U+10FFFF).
 */
export function binaryToUtf8(binary: string): string | undefined {
  if (ASCII.test(binary)) return binary;
  // escape() writes every code unit >= 0x80 as %XX, and decodeURIComponent
  // decodes runs of %XX as UTF-8, throwing a URIError on any invalid
  // sequence, as the ECMAScript spec requires.
  try {
    return decodeURIComponent(escape(binary));
  } catch {
    return undefined;
  }
}

/** Encode a string as UTF-8. `text` must be well-formed (WIT strings are). */
export function encodeUtf8(text: string): Uint8Array {
  return binaryToBytes(utf8ToBinary(text));
}

/** Decode UTF-8 strictly, as Rust's `from_utf8`: `undefined` if invalid. */
export function decodeUtf8(bytes: Uint8Array): string | undefined {
  return binaryToUtf8(bytesToBinary(bytes));
}

/** Any UTF-16 surrogate (half of a code point above U+FFFF). */
const SURROGATE = /[\ud800-\udfff]/;

/** Whether `s` has a character above U+FFFF (a surrogate pair). */
export function hasSurrogates(s: string): boolean {
  return SURROGATE.test(s);
}

/**
 * Compare two strings by their UTF-8 bytes, which is Unicode code point
 * order, as Rust's `str` ordering does. JavaScript's `<` compares UTF-16
 * code units, which puts U+E000..U+FFFF after the surrogate pairs that encode
 * U+10000 and above; code point order puts them before.
 */
export function compareUtf8(a: string, b: string): number {
  if (a === b) return 0;
  // The two orders can only disagree where one string has a surrogate; if
  // neither has one, `<` (done in C) is right.
  if (!SURROGATE.test(a) && !SURROGATE.test(b)) return a < b ? -1 : 1;
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a.charCodeAt(i) === b.charCodeAt(i)) i++;
  if (i === n) return a.length - b.length;
  // At the first differing code unit, compare code points (a surrogate
  // here is a lead surrogate, since the units before it were equal).
  return (a.codePointAt(i) as number) - (b.codePointAt(i) as number);
}

/**
 * Sort strings by their UTF-8 bytes (see compareUtf8), in place. Without
 * surrogates anywhere, JavaScript's default sort (done in C) already is
 * code point order.
 */
export function sortUtf8(strings: string[]): string[] {
  return strings.some(hasSurrogates) ? strings.sort(compareUtf8) : strings.sort();
}
