//! The real WAN between agents: certificates for mutual TLS ([`certs`]).

pub mod certs;
