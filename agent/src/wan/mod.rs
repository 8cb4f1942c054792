//! The real WAN between agents: certificates ([`certs`]) and mutual TLS ([`tls`]) for the
//! QUIC endpoint, and the WAN emulator ([`relay`], driven by the sans-IO [`shaper`]).

pub mod certs;
pub mod relay;
pub mod shaper;
pub mod tls;
