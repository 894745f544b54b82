//! A WASI command (world `wasi:cli/command`), not a raftify plugin.

fn main() {
    println!("hello from a component of another world");
}
