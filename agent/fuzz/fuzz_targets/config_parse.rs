//! Arbitrary text as an agent configuration: parsing returns a configuration or an error
//! naming the problem, never panics; an accepted configuration keeps every bound the agent
//! relies on before it starts (names, positive finite numbers, shard within count, known
//! model, data kind and strategy), and the settings the agent derives from it without I/O
//! (QUIC limits, idle timeout, windows) can be computed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightgrad::config::AgentConfig;
use weightgrad::wan::endpoint;

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let cfg = match AgentConfig::parse(text) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(!e.is_empty());
            return;
        }
    };
    assert!(dns_label(&cfg.region), "region {:?}", cfg.region);
    for p in &cfg.peers {
        assert!(dns_label(&p.name) && p.name != cfg.region, "peer {:?}", p.name);
    }
    for v in [cfg.wan.bandwidth_mbps, cfg.wan.rtt_ms, cfg.wan.peer_deadline_s, cfg.training.lr] {
        assert!(v.is_finite() && v > 0.0, "{v}");
    }
    assert!(cfg.data.shard.index < cfg.data.shard.count);
    assert!(cfg.training.workers >= 1 && cfg.training.batch_size >= 1 && cfg.training.epochs >= 1);
    assert!(cfg.model_spec().is_ok());
    assert!(cfg.data_source().is_ok());
    assert!(cfg.shard_strategy().is_ok());
    let _ = endpoint::idle_timeout(&cfg.wan);
    let _ = endpoint::window_bytes(&cfg.wan);
    let _ = cfg.wan.bandwidth_delay_bytes();
    let _ = endpoint::limits(&cfg.wan);
});
