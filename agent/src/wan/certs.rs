//! Quick-start certificates (`weightgrad certs init`): a CA and, per region, a certificate
//! whose only name is the region (DNS SAN and common name), usable both as a QUIC server
//! and as a client, signed by that CA. Production deployments bring their own PKI; what
//! the agent requires of a peer's certificate is only that it chains to the configured CA
//! and names the region the peer claims to be.

use anyhow::{Context, Result, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// Days a generated certificate stays valid.
pub const VALID_DAYS: i64 = 365;

/// Files written by [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The CA certificate (`ca.pem`) and key (`ca.key`).
    pub ca: (PathBuf, PathBuf),
    /// Per region: certificate (`NAME.pem`) and key (`NAME.key`).
    pub regions: Vec<(String, PathBuf, PathBuf)>,
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

/// A CA named `common_name`: its certificate in PEM and the issuer that signs with it.
pub fn new_ca(common_name: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params);
    let cert = params.self_signed(&key).context("signing the CA")?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// A certificate for `region`, signed by `ca`: (certificate PEM, private key PEM).
pub fn region_cert(region: &str, ca: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let key = KeyPair::generate().with_context(|| format!("generating {region}'s key"))?;
    let mut params = CertificateParams::new(vec![region.to_owned()])
        .with_context(|| format!("{region:?} is not usable as a certificate name"))?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, region);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params);
    let cert = params
        .signed_by(&key, ca)
        .with_context(|| format!("signing {region}'s certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a CA and one certificate per region into `out` (created if missing). Refuses to
/// overwrite existing files unless `force`; keys are written readable by the owner only.
pub fn init(regions: &[String], out: &Path, force: bool) -> Result<Written> {
    ensure!(!regions.is_empty(), "name at least one region");
    let mut seen = std::collections::HashSet::new();
    for r in regions {
        ensure!(seen.insert(r), "region {r:?} is listed twice");
        ensure!(
            !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "region {r:?} is not a region name (a-z, 0-9 and '-')"
        );
        ensure!(r != "ca", "\"ca\" is reserved for the CA's files");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut names = vec![("ca.pem".to_owned(), "ca.key".to_owned())];
    names.extend(
        regions
            .iter()
            .map(|r| (format!("{r}.pem"), format!("{r}.key"))),
    );
    if !force {
        for (c, k) in &names {
            for f in [c, k] {
                let p = out.join(f);
                if p.exists() {
                    bail!("{} exists; pass --force to replace it", p.display());
                }
            }
        }
    }
    let (ca_pem, ca) = new_ca("WeightGrad quick-start CA")?;
    let ca_paths = (out.join("ca.pem"), out.join("ca.key"));
    write(&ca_paths.0, &ca_pem, false)?;
    write(&ca_paths.1, &ca.key().serialize_pem(), true)?;
    let mut written = Written {
        ca: ca_paths,
        regions: Vec::new(),
    };
    for r in regions {
        let (cert, key) = region_cert(r, &ca)?;
        let (cp, kp) = (out.join(format!("{r}.pem")), out.join(format!("{r}.key")));
        write(&cp, &cert, false)?;
        write(&kp, &key, true)?;
        written.regions.push((r.clone(), cp, kp));
    }
    Ok(written)
}

fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    use std::io::Write;
    opts.open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_ca_and_one_certificate_per_region() {
        let dir = tempfile::tempdir().unwrap();
        let regions = vec!["us-east".to_string(), "eu-west".to_string()];
        let w = init(&regions, dir.path(), false).unwrap();
        assert_eq!(w.regions.len(), 2);
        let ca = std::fs::read_to_string(&w.ca.0).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        let key = std::fs::read_to_string(&w.regions[0].2).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&w.regions[0].2)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        // Existing files are not replaced without force.
        let e = init(&regions, dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        init(&regions, dir.path(), true).unwrap();
    }

    #[test]
    fn bad_region_lists_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            vec![],
            vec!["a".into(), "a".into()],
            vec!["Bad Name".into()],
            vec!["ca".into()],
        ] {
            assert!(init(&bad, dir.path(), false).is_err(), "{bad:?}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
