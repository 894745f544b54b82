//! Runs operations on the Rust kv (plugins/kv/src/lib.rs). Input: one
//! operation a line, `OP HEX` (OP: encode, decode, render, apply, query,
//! snapshot, restore; HEX: the argument's bytes). Output: one line each,
//! `ok HEX` or `err HEX`. driver.c does the same for the C kv.

use std::io::{BufRead, Write};

use raftify_guest::Plugin;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn main() {
    let mut kv = kv::Kv::default();
    let mut out = std::io::BufWriter::new(std::io::stdout());
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let (op, arg) = line.split_once(' ').unwrap_or((&line, ""));
        let arg = unhex(arg);
        let result = match op {
            // encode takes a string: non-UTF-8 text cannot reach it.
            "encode" => match std::str::from_utf8(&arg) {
                Ok(text) => kv::Kv::encode(text),
                Err(_) => Err("SKIP".to_string()),
            },
            "decode" => kv::Kv::decode(&arg).map(String::into_bytes),
            "render" => kv::Kv::render(&arg).map(String::into_bytes),
            "apply" => kv.apply(1, &arg),
            "query" => kv.query(&arg),
            "snapshot" => kv.snapshot(),
            "restore" => kv::Kv::restore(&arg).map(|restored| {
                kv = restored;
                Vec::new()
            }),
            _ => panic!("unknown op {op}"),
        };
        match result {
            Ok(bytes) => writeln!(out, "ok {}", hex(&bytes)).unwrap(),
            Err(message) => writeln!(out, "err {}", hex(message.as_bytes())).unwrap(),
        }
    }
}
