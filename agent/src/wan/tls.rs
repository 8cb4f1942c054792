//! Mutual TLS for the WAN endpoint (s2n-quic's default s2n-tls provider): only the
//! configured CA is trusted, servers require a client certificate, and a client's
//! certificate must name one of the configured peer regions.

use crate::config::TlsConfig;
use anyhow::{Context, Result};
use s2n_quic::provider::tls::default as tls;
use std::collections::HashSet;

/// The PEM texts a region's endpoint needs.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The CA every peer must chain to.
    pub ca_pem: String,
    /// This region's certificate.
    pub cert_pem: String,
    /// This region's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Reads the files a config names.
    pub fn load(files: &TlsConfig) -> Result<Self> {
        let read = |what: &str, p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {what} {}", p.display()))
        };
        Ok(Self {
            ca_pem: read("tls.ca", &files.ca)?,
            cert_pem: read("tls.cert", &files.cert)?,
            key_pem: read("tls.key", &files.key)?,
        })
    }
}

/// Accepts a client certificate only if it names one of the peer regions.
struct KnownPeers(HashSet<String>);

impl tls::callbacks::VerifyHostNameCallback for KnownPeers {
    fn verify_host_name(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// The server side: presents this region's certificate, requires a client certificate
/// from the CA that names one of `peers`.
pub fn server(id: &TlsIdentity, peers: &[String]) -> Result<tls::Server> {
    Ok(tls::Server::builder()
        .with_empty_trust_store()?
        .with_trusted_certificate(id.ca_pem.as_str())
        .context("tls.ca: not a usable CA certificate")?
        .with_certificate(id.cert_pem.as_str(), id.key_pem.as_str())
        .context("tls.cert / tls.key: not a usable certificate and key")?
        .with_client_authentication()?
        .with_verify_host_name_callback(KnownPeers(peers.iter().cloned().collect()))?
        .build()?)
}

/// The client side: trusts only the CA (the server must name the region dialled, as SNI)
/// and presents this region's certificate.
pub fn client(id: &TlsIdentity) -> Result<tls::Client> {
    Ok(tls::Client::builder()
        .with_empty_trust_store()?
        .with_certificate(id.ca_pem.as_str())
        .context("tls.ca: not a usable CA certificate")?
        .with_client_identity(id.cert_pem.as_str(), id.key_pem.as_str())
        .context("tls.cert / tls.key: not a usable certificate and key")?
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2n_quic::client::Connect;
    use s2n_quic::{Client, Server};
    use std::net::SocketAddr;
    use std::path::Path;

    fn identity(dir: &Path, region: &str) -> TlsIdentity {
        TlsIdentity::load(&TlsConfig {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{region}.pem")),
            key: dir.join(format!("{region}.key")),
        })
        .unwrap()
    }

    fn server_on(id: &TlsIdentity, peers: &[&str]) -> Server {
        let peers: Vec<String> = peers.iter().map(|s| s.to_string()).collect();
        Server::builder()
            .with_tls(server(id, &peers).unwrap())
            .unwrap()
            .with_io("127.0.0.1:0")
            .unwrap()
            .start()
            .unwrap()
    }

    /// Connects as `id` to `to` under the server name `name` and sends "hello"; an error
    /// if the handshake is refused (or nothing happens for 20 s).
    async fn connect(id: &TlsIdentity, to: SocketAddr, name: &str) -> Result<()> {
        let c = Client::builder()
            .with_tls(client(id)?)?
            .with_io("127.0.0.1:0")?
            .start()?;
        let attempt = async {
            let mut conn = c.connect(Connect::new(to).with_server_name(name)).await?;
            let mut s = conn.open_send_stream().await?;
            s.send(bytes::Bytes::from_static(b"hello")).await?;
            s.close().await?;
            anyhow::Ok(())
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), attempt)
            .await
            .context("timed out")?
    }

    #[tokio::test]
    async fn a_peer_with_a_certificate_from_the_ca_connects_and_sends() {
        let dir = tempfile::tempdir().unwrap();
        crate::wan::certs::init(&["us-east".into(), "eu-west".into()], dir.path(), false).unwrap();
        let mut srv = server_on(&identity(dir.path(), "us-east"), &["eu-west"]);
        let addr = srv.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let mut conn = srv.accept().await.expect("a connection");
            assert_eq!(conn.server_name().unwrap().unwrap().to_string(), "us-east");
            let mut stream = conn.accept_receive_stream().await.unwrap().unwrap();
            let mut got = Vec::new();
            while let Ok(Some(chunk)) = stream.receive().await {
                got.extend_from_slice(&chunk);
            }
            // Keep the connection (and endpoint) open until the test ends, so the client's
            // close sees its data acknowledged rather than the connection going away.
            (got, conn, srv)
        });
        // The right CA and a configured name: accepted, bytes flow.
        connect(&identity(dir.path(), "eu-west"), addr, "us-east")
            .await
            .unwrap();
        let (got, _conn, _srv) = accepted.await.unwrap();
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn wrong_ca_no_certificate_wrong_name_and_wrong_server_name_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        crate::wan::certs::init(
            &["us-east".into(), "eu-west".into(), "mallory".into()],
            dir.path(),
            false,
        )
        .unwrap();
        let other = tempfile::tempdir().unwrap();
        crate::wan::certs::init(&["eu-west".into()], other.path(), false).unwrap();
        let srv = server_on(&identity(dir.path(), "us-east"), &["eu-west"]);
        let addr = srv.local_addr().unwrap();
        // A certificate from another CA.
        let mut foreign = identity(other.path(), "eu-west");
        foreign.ca_pem = identity(dir.path(), "eu-west").ca_pem;
        assert!(connect(&foreign, addr, "us-east").await.is_err());
        // A certificate from the CA that names a region not configured as a peer.
        assert!(
            connect(&identity(dir.path(), "mallory"), addr, "us-east")
                .await
                .is_err()
        );
        // No certificate at all: the CA is trusted, nothing is presented.
        // (The client is built outside the attempt: only the connection may fail.)
        let id = identity(dir.path(), "eu-west");
        let tls = tls::Client::builder()
            .with_empty_trust_store()
            .unwrap()
            .with_certificate(id.ca_pem.as_str())
            .unwrap()
            .build()
            .unwrap();
        let c = Client::builder()
            .with_tls(tls)
            .unwrap()
            .with_io("127.0.0.1:0")
            .unwrap()
            .start()
            .unwrap();
        let anonymous = async {
            let mut conn = c
                .connect(Connect::new(addr).with_server_name("us-east"))
                .await?;
            let mut s = conn.open_send_stream().await?;
            s.send(bytes::Bytes::from_static(b"hello")).await?;
            s.close().await?;
            anyhow::Ok(())
        };
        let refused = tokio::time::timeout(std::time::Duration::from_secs(20), anonymous).await;
        assert!(matches!(refused, Ok(Err(_))), "{refused:?}");
        // Dialling the server under another region's name: its certificate does not match.
        assert!(
            connect(&identity(dir.path(), "eu-west"), addr, "ap-southeast")
                .await
                .is_err()
        );
        drop(srv);
    }
}
