//! `weightgrad certs init` and `weightgrad config check` through the real binary.

use std::path::Path;
use weightgrad_tests::{weightgrad, weightgrad_ok};

fn config(dir: &Path, region: &str, extra: &str) -> String {
    format!(
        r#"region = "{region}"

[wan]
listen = "127.0.0.1:4433"

[[peers]]
name = "eu-west"
address = "127.0.0.1:4434"

[tls]
ca = "certs/ca.pem"
cert = "certs/{region}.pem"
key = "certs/{region}.key"

[admin]
token_file = "admin.token"

[checkpoint]
dir = "{}"
{extra}"#,
        dir.join("state").display()
    )
}

fn check(dir: &Path, text: &str) -> (bool, String) {
    let file = dir.join("region.toml");
    std::fs::write(&file, text).unwrap();
    let out = weightgrad(&["config", "check", file.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn certificates_and_a_config_that_uses_them_check_out() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = weightgrad_ok(&[
        "certs",
        "init",
        "--regions",
        "us-east,eu-west",
        "--out",
        certs.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("us-east"));
    for f in [
        "ca.pem",
        "ca.key",
        "us-east.pem",
        "us-east.key",
        "eu-west.pem",
        "eu-west.key",
    ] {
        assert!(certs.join(f).is_file(), "{f} missing");
    }
    // A second init refuses to overwrite.
    let again = weightgrad(&[
        "certs",
        "init",
        "--regions",
        "us-east",
        "--out",
        certs.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    std::fs::write(dir.path().join("admin.token"), "0123456789abcdef0123").unwrap();
    let (ok, text) = check(dir.path(), &config(dir.path(), "us-east", ""));
    assert!(ok, "{text}");
    assert!(
        text.contains("ok") && text.contains("region us-east"),
        "{text}"
    );

    // A policy component by path: a good one passes, garbage is refused by the sandbox.
    let wasm = dir.path().join("p.wasm");
    weightgrad_ok(&["policy", "export", "gaia", "-o", wasm.to_str().unwrap()]);
    let extra = "\n[policy]\nsource = \"p.wasm\"\n";
    let (ok, text) = check(dir.path(), &config(dir.path(), "us-east", extra));
    assert!(ok, "{text}");
    std::fs::write(&wasm, b"junk").unwrap();
    let (ok, text) = check(dir.path(), &config(dir.path(), "us-east", extra));
    assert!(!ok && text.contains("policy.source"), "{text}");
}

#[test]
fn problems_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing on disk: every named file is reported, each with its key.
    let (ok, text) = check(dir.path(), &config(dir.path(), "us-east", ""));
    assert!(!ok);
    for key in ["tls.ca", "tls.cert", "tls.key", "admin.token_file"] {
        assert!(text.contains(key), "{key} not reported: {text}");
    }
    assert!(text.contains("region.toml"), "{text}");
    // An unknown key.
    let (ok, text) = check(
        dir.path(),
        &config(dir.path(), "us-east", "\n[training]\nbatchsize = 8\n"),
    );
    assert!(
        !ok && text.contains("batchsize") && text.contains("region.toml"),
        "{text}"
    );
    // A short admin token.
    weightgrad_ok(&[
        "certs",
        "init",
        "--regions",
        "us-east",
        "--out",
        dir.path().join("certs").to_str().unwrap(),
    ]);
    std::fs::write(dir.path().join("admin.token"), "short").unwrap();
    let (ok, text) = check(dir.path(), &config(dir.path(), "us-east", ""));
    assert!(!ok && text.contains("shorter than 16"), "{text}");
}
