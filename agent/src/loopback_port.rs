//! Loopback ports for the processes this one starts and points at each other (the bench's
//! real agents, the test suite's clusters), chosen so that nothing else takes them before
//! those processes bind them.
//!
//! Asking the kernel for a port (binding port 0) and handing its number to a child races
//! with every other socket that binds port 0 meanwhile: the kernel hands out its ephemeral
//! range at random, so a relay, a QUIC client or an HTTP connection in this or another
//! process can be given the same port before the child binds it, and the child fails with
//! "address in use". Ports here are drawn below the ephemeral range instead (which binding
//! port 0 never returns), at a random place so that concurrent processes rarely meet, are
//! checked free for both UDP and TCP, and are never handed out twice by one process.

use anyhow::{Result, bail};
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::ops::Range;
use std::sync::{LazyLock, Mutex};

/// How many ports below the ephemeral range are drawn from.
const SPAN: u16 = 16_384;

/// The lowest port drawn from (the ports below are the well-known and system ones).
const LOWEST: u16 = 1_024;

/// The kernel's ephemeral range when it cannot be read (Linux's default).
const DEFAULT_EPHEMERAL: (u16, u16) = (32_768, 60_999);

/// Ports this process has handed out.
static HANDED_OUT: LazyLock<Mutex<HashSet<u16>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// A loopback address whose port is free for UDP and TCP, outside the kernel's ephemeral
/// range, and not handed out before by this process.
pub fn unused() -> Result<SocketAddr> {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| parse_range(&t))
        .unwrap_or(DEFAULT_EPHEMERAL);
    let range = below(ephemeral);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let offset = if range.is_empty() {
        0
    } else {
        rand::random_range(0..range.len())
    };
    let port = first_free(range, offset, |p| !handed_out.contains(&p) && free(p));
    let port = match port {
        Some(p) => p,
        // No room below the ephemeral range: let the kernel pick (the race is back, rare).
        None => kernel_pick(&handed_out)?,
    };
    handed_out.insert(port);
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// The two ports of an `ip_local_port_range` text.
fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// The ports drawn from, below the ephemeral range `(low, high)`.
fn below((low, _high): (u16, u16)) -> Range<u16> {
    low.saturating_sub(SPAN).max(LOWEST)..low.max(LOWEST)
}

/// The first port of `range`, walked from `offset` and wrapping round, that `ok` accepts.
fn first_free(range: Range<u16>, offset: usize, mut ok: impl FnMut(u16) -> bool) -> Option<u16> {
    let n = range.len();
    (0..n)
        .map(|k| range.start + ((offset + k) % n) as u16)
        .find(|&p| ok(p))
}

/// Whether nothing holds `port` on loopback, for UDP or TCP.
fn free(port: u16) -> bool {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
        && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A port the kernel picks that is free for UDP and TCP and not in `handed_out`.
fn kernel_pick(handed_out: &HashSet<u16>) -> Result<u16> {
    for _ in 0..64 {
        let port = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        if !handed_out.contains(&port) && free(port) {
            return Ok(port);
        }
    }
    bail!("no loopback port is free for both UDP and TCP")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_drawn_below_the_ephemeral_range_and_above_the_system_ones() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32_768, 60_999)));
        assert_eq!(parse_range("junk"), None);
        assert_eq!(below((32_768, 60_999)), 16_384..32_768);
        assert_eq!(below((10_000, 60_999)), 1_024..10_000);
        assert!(below((1_000, 2_000)).is_empty());
    }

    #[test]
    fn the_walk_wraps_round_from_its_offset() {
        let mut seen = Vec::new();
        let p = first_free(10..14, 2, |p| {
            seen.push(p);
            p == 11
        });
        assert_eq!(p, Some(11));
        assert_eq!(seen, [12, 13, 10, 11]);
        assert_eq!(first_free(10..14, 1, |_| false), None);
        assert_eq!(first_free(10..10, 0, |_| true), None);
    }

    #[test]
    fn a_port_is_never_handed_out_twice_and_is_free_for_udp_and_tcp() {
        let ports: Vec<SocketAddr> = (0..200).map(|_| unused().unwrap()).collect();
        let distinct: HashSet<u16> = ports.iter().map(|a| a.port()).collect();
        assert_eq!(distinct.len(), ports.len());
        for a in &ports[..5] {
            assert!(a.ip().is_loopback());
            UdpSocket::bind(a).unwrap();
            TcpListener::bind(a).unwrap();
        }
    }

    #[test]
    fn a_port_held_by_another_socket_is_skipped() {
        let held = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(!free(port));
        assert_eq!(first_free(port..port + 1, 0, free), None);
    }
}
