//! Regions and the links between them.

use crate::sim::wan::LinkModel;

/// Region names and a symmetric link matrix.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Region names.
    pub regions: Vec<String>,
    /// `links[a][b]`: the link from `a` to `b` (`a != b`).
    pub links: Vec<Vec<LinkModel>>,
}

/// Default inter-region bandwidth: 100 Mbit/s.
pub const DEFAULT_BANDWIDTH_BPS: f64 = 100e6;

impl Topology {
    /// `n` regions. The first three resemble us-east, eu-west and ap-southeast (RTT 80 ms
    /// us–eu, 160 ms eu–ap, 230 ms us–ap); further regions sit 150 ms from every other.
    /// Every link carries 100 Mbit/s with 2 ms of jitter and no loss.
    pub fn default_for(n: usize) -> Self {
        let named = ["us-east", "eu-west", "ap-southeast"];
        let regions = (0..n)
            .map(|i| {
                named
                    .get(i)
                    .map_or_else(|| format!("region-{i}"), |s| s.to_string())
            })
            .collect();
        let rtt = |a: usize, b: usize| match (a.min(b), a.max(b)) {
            (0, 1) => 0.080,
            (1, 2) => 0.160,
            (0, 2) => 0.230,
            _ => 0.150,
        };
        let links = (0..n)
            .map(|a| {
                (0..n)
                    .map(|b| LinkModel {
                        bandwidth_bps: DEFAULT_BANDWIDTH_BPS,
                        rtt_s: if a == b { 0.0 } else { rtt(a, b) },
                        jitter_s: 0.002,
                        loss: 0.0,
                    })
                    .collect()
            })
            .collect();
        Self { regions, links }
    }

    /// The link from `a` to `b`.
    pub fn link(&self, a: usize, b: usize) -> LinkModel {
        self.links[a][b]
    }
}
