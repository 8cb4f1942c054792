//! The real WAN between agents: certificates for mutual TLS ([`certs`]) and the WAN
//! emulator ([`relay`], driven by the sans-IO [`shaper`]).

pub mod certs;
pub mod relay;
pub mod shaper;
