//! A private network for partition tests: one network namespace per node
//! slot, each with a veth into one bridge in the test's own namespace, on
//! a /24 of 10.213.0.0/16 that nothing else uses. Cutting a slot's link
//! partitions that node from every other node and from the clients;
//! healing it brings the link back. Traffic never leaves the namespaces the
//! test made.
//!
//! It needs CAP_NET_ADMIN (root, as in CI). Where namespaces cannot be made,
//! `Lan::new` says why and the caller leaves partitions out.

use std::process::Command;

/// `ip`, by absolute path: nodes and CLI calls run with an empty
/// environment, so there is no PATH to search.
pub fn ip_binary() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .unwrap_or("ip")
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new(ip_binary())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_output(args: &[&str]) -> String {
    Command::new(ip_binary())
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// Names are `rft<pid>...`: remove what a test process that no longer
/// exists left behind (it was killed before its `Drop` ran).
fn remove_leftovers() {
    let alive = |name: &str| {
        let digits: String = name
            .trim_start_matches("rft")
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.is_empty() || std::path::Path::new(&format!("/proc/{digits}")).exists()
    };
    for line in ip_output(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with("rft") && !alive(name) {
            let _ = ip(&["netns", "del", name]);
        }
    }
    for line in ip_output(&["-o", "link", "show"]).lines() {
        // "7: rft123b: <...>" or "8: rft123v1@if2: <...>"
        let Some(name) = line.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else {
            continue;
        };
        if name.starts_with("rft") && !alive(name) {
            let _ = ip(&["link", "del", name]);
        }
    }
}

pub struct Lan {
    tag: String,
    subnet: u32,
    slots: usize,
}

impl Lan {
    /// A bridge and `slots` namespaces, or why they cannot be made.
    pub fn new(slots: usize) -> Result<Lan, String> {
        remove_leftovers();
        let pid = std::process::id();
        let lan = Lan {
            tag: format!("rft{pid}"),
            subnet: pid % 250 + 1,
            slots: 0,
        };
        let mut lan = lan;
        let bridge = lan.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.213.{}.254/24", lan.subnet), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for slot in 0..slots {
            let (netns, veth) = (lan.netns(slot), lan.veth(slot));
            ip(&["netns", "add", &netns])?;
            lan.slots = slot + 1;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{}/24", lan.ip(slot)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        }
        Ok(lan)
    }

    fn bridge(&self) -> String {
        format!("{}b", self.tag)
    }

    fn veth(&self, slot: usize) -> String {
        format!("{}v{slot}", self.tag)
    }

    /// The namespace that slot's node runs in.
    pub fn netns(&self, slot: usize) -> String {
        format!("{}-{slot}", self.tag)
    }

    /// That slot's address.
    pub fn ip(&self, slot: usize) -> String {
        format!("10.213.{}.{}", self.subnet, slot + 1)
    }

    /// Partition the slot from everyone: its link goes down.
    pub fn cut(&self, slot: usize) {
        ip(&["link", "set", &self.veth(slot), "down"]).expect("cut a slot's link");
    }

    /// Bring the slot's link back.
    pub fn heal(&self, slot: usize) {
        ip(&["link", "set", &self.veth(slot), "up"]).expect("heal a slot's link");
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for slot in 0..self.slots {
            let _ = ip(&["link", "del", &self.veth(slot)]);
            let _ = ip(&["netns", "del", &self.netns(slot)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}
