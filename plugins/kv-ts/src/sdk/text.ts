// Splitting command text into words, as Rust's `str::split_whitespace` does.

/**
 * Rust's `char::is_whitespace` (the Unicode White_Space property). Not the
 * same as JavaScript's `\s`, which also matches U+FEFF and misses U+0085.
 */
const WHITESPACE_RUNS = /[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/g;

/** ASCII with no whitespace but plain spaces: the common case, one C pass. */
const ASCII_SPACES_ONLY = /^[\x00-\x08\x0e-\x7f]*$/;

/** No whitespace but plain spaces. */
const SPACES_ONLY = /^[^\t-\r\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;

/** `text.split_whitespace().collect()`: the words, without empty ones. */
export function splitWhitespace(text: string): string[] {
  // Fuel: `String.prototype.split` with a regular expression runs the
  // expression once per character position (~1500 fuel per byte in
  // QuickJS), so split on " " (C, ~15 fuel per byte), after one regular
  // expression pass checks that no other whitespace is there, or turns it
  // into spaces.
  let spaced = text;
  if (!ASCII_SPACES_ONLY.test(text) && !SPACES_ONLY.test(text)) {
    spaced = text.replace(WHITESPACE_RUNS, " ");
  }
  // Runs of spaces, and spaces at either end, leave empty words.
  return spaced.split(" ").filter((word) => word !== "");
}
