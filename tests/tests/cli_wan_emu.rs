//! `weightgrad wan-emu` as a process: relays datagrams, or TCP streams with `--tcp`, through
//! the emulated link, reports on SIGTERM, refuses bad settings by name.

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weightgrad_tests::binary;
use weightgrad_tests::weightgrad;

/// Starts `wan-emu` (with `mode`'s flags) from `listen` to `upstream` at `mbps`, 20 ms one
/// way, its report kept for [`stop_and_report`].
fn spawn_wan_emu(
    mode: &[&str],
    listen: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    mbps: &str,
) -> std::process::Child {
    Command::new(binary())
        .arg("wan-emu")
        .args(mode)
        .args(["--listen", &listen.to_string()])
        .args(["--upstream", &upstream.to_string()])
        .args(["--mbps", mbps, "--delay-ms", "20"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Stops a running `wan-emu` with SIGTERM and returns what it reported; it must exit 0.
fn stop_and_report(relay: std::process::Child) -> String {
    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    let out = relay.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

#[test]
fn relays_datagrams_and_reports_on_sigterm() {
    // An echo server the relay forwards to.
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream = server.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    // A free port for the relay.
    let listen = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = spawn_wan_emu(&[], listen, upstream, "10");
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Retry until the relay is up, then time one echo.
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(30);
    let rtt = loop {
        assert!(Instant::now() < deadline, "no echo through the relay");
        let sent = Instant::now();
        client.send_to(b"ping", listen).unwrap();
        if let Ok((n, _)) = client.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"ping");
            break sent.elapsed();
        }
    };
    assert!(rtt >= Duration::from_millis(40), "{rtt:?}");
    let stderr = stop_and_report(relay);
    assert!(
        stderr.contains("client -> upstream:") && stderr.contains("delivered"),
        "{stderr}"
    );
}

#[test]
fn tcp_mode_relays_a_stream_through_the_link() {
    use std::io::{Read, Write};
    // An echo server that closes after echoing a stream to its end.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = server.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in server.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut back = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut back);
                let _ = back.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = spawn_wan_emu(&["--tcp"], listen, upstream, "8");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        assert!(Instant::now() < deadline, "the relay never listened");
        match std::net::TcpStream::connect(listen) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let started = Instant::now();
    let mut writer = client.try_clone().unwrap();
    let sent = payload.clone();
    let send = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    send.join().unwrap();
    assert!(back == payload, "the stream came back altered");
    // 100 kB at 1 MB/s each way, overlapping, plus the round trip.
    assert!(
        started.elapsed() >= Duration::from_millis(140),
        "{:?}",
        started.elapsed()
    );
    let stderr = stop_and_report(relay);
    assert!(
        stderr.contains("1 connections") && stderr.contains("100000 bytes client -> upstream"),
        "{stderr}"
    );
    let out = weightgrad(&[
        "wan-emu",
        "--tcp",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:9",
        "--loss",
        "0.01",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot lose bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tcp_json_lines_give_the_address_and_the_counters() {
    use std::io::{BufRead, BufReader, Write};
    // A sink that reads each connection to its end.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = server.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in server.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || std::io::copy(&mut s, &mut std::io::sink()));
        }
    });
    let mut relay = Command::new(binary())
        .args(["wan-emu", "--tcp", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream.to_string()])
        .args(["--mbps", "100", "--delay-ms", "5", "--json-every-ms", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(relay.stdout.take().unwrap()).lines();
    let mut next = || -> serde_json::Value {
        serde_json::from_str(&lines.next().expect("a JSON line").unwrap()).unwrap()
    };
    // Port 0: the first line says which port it got.
    let first = next();
    let listening: std::net::SocketAddr = first["listening"].as_str().unwrap().parse().unwrap();
    assert_ne!(listening.port(), 0, "{first}");
    let mut client = std::net::TcpStream::connect(listening).unwrap();
    client.write_all(&[7u8; 10_000]).unwrap();
    drop(client);
    // The counters climb to what was sent, stamped with the clock.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = next();
        assert!(line["unix_s"].as_f64().unwrap() > 1.6e9, "{line}");
        if line["up_bytes"] == 10_000 {
            assert_eq!(line["connections"], 1, "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "never delivered: {line}");
    }
    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    let last = std::iter::from_fn(|| lines.next().map(Result::unwrap))
        .last()
        .expect("a last line");
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(
        (last["last"].as_bool(), last["up_bytes"].as_u64()),
        (Some(true), Some(10_000))
    );
    assert!(relay.wait().unwrap().success());
}

#[test]
fn bad_settings_are_refused_by_name() {
    for (flag, value, says) in [
        ("--loss", "1.5", "loss"),
        ("--json-every-ms", "20", "--tcp"),
    ] {
        let out = weightgrad(&[
            "wan-emu",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            flag,
            value,
        ]);
        assert!(!out.status.success(), "{flag}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{flag}"
        );
    }
    let out = weightgrad(&[
        "wan-emu",
        "--listen",
        "nowhere",
        "--upstream",
        "127.0.0.1:9",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}
