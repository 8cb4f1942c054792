//! The real WAN between agents: certificates ([`certs`]) and mutual TLS ([`tls`]), QUIC
//! endpoints sized for the link ([`endpoint`]), the application [`handshake`], messages on
//! streams ([`framing`]), outgoing links with reconnect ([`link`], [`backoff`]), the
//! accepting side ([`inbound`]), transport statistics ([`telemetry`]), and the WAN emulator
//! ([`relay`], driven by the sans-IO [`shaper`]).

pub mod backoff;
pub mod certs;
pub mod endpoint;
pub mod framing;
pub mod handshake;
pub mod inbound;
pub mod link;
pub mod relay;
pub mod shaper;
pub mod tcp_relay;
pub mod telemetry;
pub mod tls;
