// Signed 64-bit integers, as Rust's `i64` parses and prints them.
//
// JavaScript numbers are doubles: exact only up to 2^53. Use BigInt for
// anything that must behave like a Rust i64 (`123n`, `BigInt("123")`).

export const I64_MIN = -(2n ** 63n);
export const I64_MAX = 2n ** 63n - 1n;

/** What `str::parse::<i64>` accepts: an optional sign, then ASCII digits. */
const INTEGER = /^([+-]?)0*([0-9]+)$/;

/**
 * `text.parse::<i64>().ok()`: the value, or `undefined` if `text` is not an
 * integer (no spaces, `_`, `.`, exponent or `0x` allowed) or is out of range.
 */
export function parseI64(text: string): bigint | undefined {
  const m = INTEGER.exec(text);
  if (m === null) return undefined;
  const [, sign, digits] = m;
  // Leading zeros are gone, so more than 19 digits is out of range (and
  // BigInt() of a huge digit string would be slow).
  if (digits.length > 19) return undefined;
  const value = sign === "-" ? -BigInt(digits) : BigInt(digits);
  return inI64(value) ? value : undefined;
}

/** Whether `value` fits in an i64. */
export function inI64(value: bigint): boolean {
  return value >= I64_MIN && value <= I64_MAX;
}

/** `a.checked_add(b)`: the sum, or `undefined` on i64 overflow. */
export function checkedAddI64(a: bigint, b: bigint): bigint | undefined {
  const sum = a + b;
  return inI64(sum) ? sum : undefined;
}
