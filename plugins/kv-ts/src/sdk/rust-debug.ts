// Rust's `{:?}` formatting of a string, for error messages that must match a
// Rust plugin's byte for byte.
//
// `format!("{:?}", s)` puts `s` in double quotes and escapes:
// - `\0 \t \n \r " \` as `\0 \t \n \r \" \\`;
// - every character that is not printable or is grapheme-extending (control
//   characters, unassigned code points, combining marks, ...) as `\u{hex}`;
// - nothing else: other non-ASCII characters, and `'`, stay as they are.
// Which characters are "printable" comes from Rust's Unicode tables, copied
// into rust-debug-table.ts by tools/gen-rust-debug-table.rs.

import { ESCAPED_RANGES } from "./rust-debug-table.js";

// Parsed once, at module initialization: componentize-qjs runs that at build
// time and snapshots the result into the component, so calls pay nothing.
const starts: number[] = [];
const ends: number[] = [];
for (const item of ESCAPED_RANGES.split(",")) {
  if (item === "") continue;
  const [first, last] = item.split("-");
  starts.push(parseInt(first, 16));
  ends.push(parseInt(last, 16));
}

function escapedAsUnicode(cp: number): boolean {
  let lo = 0;
  let hi = starts.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (cp < starts[mid]) hi = mid - 1;
    else if (cp > ends[mid]) lo = mid + 1;
    else return true;
  }
  return false;
}

const NAMED: Record<string, string> = {
  "\0": "\\0",
  "\t": "\\t",
  "\n": "\\n",
  "\r": "\\r",
  '"': '\\"',
  "\\": "\\\\",
};

/** Printable ASCII other than `"` and `\`: needs no escaping at all. */
const PLAIN = /^[\x20\x21\x23-\x5b\x5d-\x7e]*$/;

/** `format!("{:?}", s)` of a Rust `&str`. */
export function rustDebugStr(s: string): string {
  if (PLAIN.test(s)) return `"${s}"`;
  let out = '"';
  for (const ch of s) {
    const named = NAMED[ch];
    if (named !== undefined) {
      out += named;
      continue;
    }
    const cp = ch.codePointAt(0) as number;
    out += escapedAsUnicode(cp) ? `\\u{${cp.toString(16)}}` : ch;
  }
  return out + '"';
}
