//! The geo-sync core: per-peer residuals, significance filtering with error feedback, the
//! mirror clock and the merge of peers' updates. Sans-IO; the simulator and the real WAN
//! drive the same code.

pub mod clock;
pub mod message;
pub mod region;
pub mod snapshot;

pub use clock::MirrorClock;
pub use message::{Resumed, RoundEnd, WanMessage};
pub use region::{
    LinkCounters, Merge, MergeMode, Outgoing, ReceiveError, RegionSync, SyncConfig, TensorMeta,
};
pub use snapshot::{Snapshot, decode_snapshot, encode_snapshot};

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, seq::IndexedRandom};
    use rand_chacha::ChaCha8Rng;
    use weightgrad_sdk::{LinkPlan, TensorPlan, TensorRole};

    const REGIONS: usize = 3;

    fn metas() -> Vec<TensorMeta> {
        vec![
            TensorMeta {
                numel: 40,
                role: TensorRole::Weight,
            },
            TensorMeta {
                numel: 7,
                role: TensorRole::Bias,
            },
            TensorMeta {
                numel: 300,
                role: TensorRole::Weight,
            },
        ]
    }

    fn names() -> Vec<String> {
        (0..REGIONS).map(|i| format!("r{i}")).collect()
    }

    /// A plan that sends each of `tensors` tensors whole, in fp32.
    fn send_all_fp32(tensors: usize) -> LinkPlan {
        let whole = TensorPlan {
            send: true,
            tau: 0.0,
            bits: 32,
            top_fraction: 1.0,
        };
        LinkPlan {
            tensors: vec![whole; tensors],
        }
    }

    /// Every region's name but `me`'s, in order: region `me`'s peers.
    fn peers(me: usize) -> Vec<String> {
        let mut names = names();
        names.remove(me);
        names
    }

    fn random_plan(rng: &mut ChaCha8Rng, tensors: usize) -> LinkPlan {
        LinkPlan {
            tensors: (0..tensors)
                .map(|_| TensorPlan {
                    send: rng.random_bool(0.8),
                    tau: *[0.0f32, 0.001, 0.01, 0.1, 1.0].choose(rng).unwrap(),
                    bits: *[1u8, 2, 3, 4, 8, 16, 32].choose(rng).unwrap(),
                    top_fraction: *[1.0f32, 0.5, 0.1, 0.01].choose(rng).unwrap(),
                })
                .collect(),
        }
    }

    struct Node {
        sync: RegionSync,
        weights: Vec<Vec<f32>>,
        /// Σ local updates, per tensor (f64).
        local_sum: Vec<Vec<f64>>,
        /// Σ decoded sent, per link and tensor (f64).
        sent_sum: Vec<Vec<Vec<f64>>>,
    }

    #[allow(clippy::needless_range_loop)] // element-wise checks across parallel tables
    /// Thousands of rounds with random plans, random delivery order, duplicated frames and
    /// random scheduling: per-link conservation, no double application, staleness bound.
    #[test]
    fn conservation_no_double_apply_and_staleness_under_random_plans() {
        let metas = metas();
        let names = names();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let max_staleness = 2;
        let config = SyncConfig {
            max_staleness,
            audit: true,
            ..SyncConfig::default()
        };
        let mut nodes: Vec<Node> = (0..REGIONS)
            .map(|r| {
                let peers: Vec<String> =
                    names.iter().filter(|n| **n != names[r]).cloned().collect();
                Node {
                    sync: RegionSync::new(
                        &names[r],
                        &peers,
                        metas.clone(),
                        config.clone(),
                        r as u64,
                    ),
                    weights: metas
                        .iter()
                        .map(|m| (0..m.numel).map(|i| (i % 5) as f32 - 2.0).collect())
                        .collect(),
                    local_sum: metas.iter().map(|m| vec![0.0; m.numel]).collect(),
                    sent_sum: (0..REGIONS - 1)
                        .map(|_| metas.iter().map(|m| vec![0.0; m.numel]).collect())
                        .collect(),
                }
            })
            .collect();
        let initial: Vec<Vec<f32>> = nodes[0].weights.clone();
        // In-flight messages: (to, from, bytes).
        let mut in_flight: Vec<(usize, usize, Vec<u8>)> = Vec::new();
        let mut duplicates_refused = 0;
        let link_to = |from: usize, to: usize| if to < from { to } else { to - 1 };
        let target_rounds = 1500;
        let mut steps = 0;
        while nodes.iter().any(|n| n.sync.round() < target_rounds) || !in_flight.is_empty() {
            steps += 1;
            assert!(
                steps < 1_000_000,
                "no progress: the staleness bound deadlocked"
            );
            let deliver = !in_flight.is_empty()
                && (rng.random_bool(0.5)
                    || nodes
                        .iter()
                        .all(|n| n.sync.round() >= target_rounds || !n.sync.may_start_next()));
            if deliver {
                let k = rng.random_range(0..in_flight.len());
                let (to, from, bytes) = in_flight.swap_remove(k);
                let l = link_to(to, from);
                let node = &mut nodes[to];
                let before = node.weights.clone();
                match node.sync.receive(l, &bytes, &mut node.weights) {
                    Ok(()) => {}
                    Err(ReceiveError::Duplicate { .. }) => {
                        duplicates_refused += 1;
                        assert_eq!(before, node.weights, "a refused frame changed the weights");
                    }
                    Err(e) => panic!("unexpected refusal: {e}"),
                }
                continue;
            }
            let r = rng.random_range(0..REGIONS);
            let node = &mut nodes[r];
            if node.sync.round() >= target_rounds || !node.sync.may_start_next() {
                continue;
            }
            // Staleness bound: the round about to finish is at most max_staleness ahead.
            if let Some(slowest) = node.sync.clock().slowest_live() {
                assert!(
                    node.sync.round() <= slowest + max_staleness,
                    "staleness bound exceeded"
                );
            }
            let delta: Vec<Vec<f32>> = metas
                .iter()
                .map(|m| {
                    (0..m.numel)
                        .map(|_| rng.random_range(-0.05f32..0.05))
                        .collect()
                })
                .collect();
            for (w, d) in node.weights.iter_mut().zip(&delta) {
                w.iter_mut().zip(d).for_each(|(w, d)| *w += d);
            }
            for (s, d) in node.local_sum.iter_mut().zip(&delta) {
                s.iter_mut().zip(d).for_each(|(s, d)| *s += f64::from(*d));
            }
            node.sync.add_local_update(&delta);
            let plans: Vec<LinkPlan> = (0..REGIONS - 1)
                .map(|_| random_plan(&mut rng, metas.len()))
                .collect();
            let outgoing = node.sync.finish_round(&node.weights, &plans).unwrap();
            for out in outgoing {
                for (t, upd) in &out.decoded {
                    let mut dense = vec![0.0f32; metas[*t as usize].numel];
                    upd.add_to(&mut dense, 1.0);
                    for (s, v) in node.sent_sum[out.link][*t as usize].iter_mut().zip(&dense) {
                        *s += f64::from(*v);
                    }
                }
                let peer = if out.link < r { out.link } else { out.link + 1 };
                for m in out.messages {
                    let bytes = m.to_bytes();
                    if matches!(m, WanMessage::Frame(_)) && rng.random_bool(0.05) {
                        in_flight.push((peer, r, bytes.clone()));
                    }
                    in_flight.push((peer, r, bytes));
                }
            }
        }
        assert!(
            duplicates_refused > 0,
            "the test injected duplicates; some must have been refused"
        );
        for (r, node) in nodes.iter().enumerate() {
            assert_eq!(node.sync.round(), target_rounds);
            for l in 0..REGIONS - 1 {
                // Conservation per link: Σ decoded sent + residual = Σ local updates.
                for (t, m) in metas.iter().enumerate() {
                    for i in 0..m.numel {
                        let lhs = node.sent_sum[l][t][i] + f64::from(node.sync.residual(l)[t][i]);
                        let rhs = node.local_sum[t][i];
                        assert!(
                            (lhs - rhs).abs() < 1e-3,
                            "region {r} link {l} tensor {t}[{i}]: {lhs} vs {rhs}"
                        );
                    }
                }
                assert_eq!(node.sync.clock().complete(l), target_rounds);
                // The region's own audit agrees.
                let audit = node.sync.conservation_error(l).unwrap();
                assert!(audit < 1e-5, "region {r} link {l}: audit {audit}");
            }
            // Every peer's decoded updates were applied exactly once: w = w0 + own + Σ peers' sent to r.
            for (t, m) in metas.iter().enumerate() {
                for i in 0..m.numel {
                    let mut expect = f64::from(initial[t][i]) + node.local_sum[t][i];
                    for (p, peer) in nodes.iter().enumerate().filter(|(p, _)| *p != r) {
                        expect += peer.sent_sum[link_to(p, r)][t][i];
                    }
                    let got = f64::from(node.weights[t][i]);
                    assert!(
                        (got - expect).abs() < 1e-2,
                        "region {r} tensor {t}[{i}]: {got} vs {expect}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_frames_are_refused_and_change_nothing() {
        let metas = metas();
        let mut a = RegionSync::new("a", &["b".into()], metas.clone(), SyncConfig::default(), 1);
        let mut b = RegionSync::new("b", &["a".into()], metas.clone(), SyncConfig::default(), 2);
        let mut wa: Vec<Vec<f32>> = metas.iter().map(|m| vec![1.0; m.numel]).collect();
        let mut wb = wa.clone();
        let delta: Vec<Vec<f32>> = metas.iter().map(|m| vec![0.5; m.numel]).collect();
        a.add_local_update(&delta);
        let plan = send_all_fp32(3);
        let out = a.finish_round(&wa, &[plan]).unwrap();
        let frame = out[0].messages[0].to_bytes();

        let snapshot = wb.clone();
        let err = b
            .receive(0, &frame[..frame.len() - 1], &mut wb)
            .unwrap_err()
            .to_string();
        assert!(err.contains("from a"), "{err}");
        let mut wrong_model = RegionSync::new(
            "b",
            &["a".into()],
            vec![TensorMeta {
                numel: 3,
                role: TensorRole::Weight,
            }],
            SyncConfig::default(),
            3,
        );
        let err = wrong_model
            .receive(0, &frame, &mut wb)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has 3 elements"), "{err}");
        let mut impostor =
            RegionSync::new("b", &["c".into()], metas.clone(), SyncConfig::default(), 3);
        let err = impostor
            .receive(0, &frame, &mut wb)
            .unwrap_err()
            .to_string();
        assert!(err.contains("claims sender"), "{err}");
        assert_eq!(wb, snapshot);
        b.receive(0, &frame, &mut wb).unwrap();
        assert_ne!(wb, snapshot);
        let err = b.receive(0, &frame, &mut wb).unwrap_err().to_string();
        assert!(err.contains("duplicate"), "{err}");
        assert_eq!(b.counters(0).rejected, 1);
        assert_eq!(b.counters(0).duplicates, 1);
        wa[0][0] = 0.0;
    }

    #[test]
    fn mean_merge_averages_regions_and_steps_from_the_anchor() {
        let metas = vec![TensorMeta {
            numel: 3,
            role: TensorRole::Weight,
        }];
        let config = SyncConfig {
            merge: MergeMode::Mean {
                every: 2,
                outer_lr: 1.0,
                momentum: 0.0,
            },
            max_staleness: 5,
            ..SyncConfig::default()
        };
        let mut a = RegionSync::new("a", &["b".into()], metas.clone(), config.clone(), 1);
        let mut b = RegionSync::new("b", &["a".into()], metas.clone(), config, 2);
        let w0 = vec![vec![1.0f32, 2.0, 3.0]];
        let (mut wa, mut wb) = (w0.clone(), w0.clone());
        a.start(&wa);
        b.start(&wb);
        let send = LinkPlan {
            tensors: vec![TensorPlan {
                send: true,
                tau: 0.0,
                bits: 32,
                top_fraction: 1.0,
            }],
        };
        let exchange = |a: &mut RegionSync,
                        b: &mut RegionSync,
                        wa: &mut Vec<Vec<f32>>,
                        wb: &mut Vec<Vec<f32>>,
                        da: f32,
                        db: f32,
                        plan: &LinkPlan| {
            for (w, d, s) in [(&mut *wa, da, &mut *a), (&mut *wb, db, &mut *b)] {
                let delta = vec![vec![d; 3]];
                w[0].iter_mut().for_each(|v| *v += d);
                s.add_local_update(&delta);
            }
            let out_a = a.finish_round(wa, std::slice::from_ref(plan)).unwrap();
            let out_b = b.finish_round(wb, std::slice::from_ref(plan)).unwrap();
            for m in &out_a[0].messages {
                b.receive(0, &m.to_bytes(), wb).unwrap();
            }
            for m in &out_b[0].messages {
                a.receive(0, &m.to_bytes(), wa).unwrap();
            }
        };
        // Round 1 is sent between outer steps; the outer step at round 2 must merge it too.
        exchange(&mut a, &mut b, &mut wa, &mut wb, 0.5, 0.1, &send);
        assert!(a.outer_due().is_none() && a.may_start_next());
        assert_eq!(
            wa[0],
            vec![1.5, 2.5, 3.5],
            "received updates wait for the outer step"
        );
        exchange(&mut a, &mut b, &mut wa, &mut wb, 0.5, 0.1, &send);
        assert_eq!(a.outer_due(), Some(2));
        assert!(!a.may_start_next(), "the outer step must come first");
        assert!(a.apply_outer_step(&mut wa) && b.apply_outer_step(&mut wb));
        // Mean of (+1.0, +0.2: both rounds of each region) from the anchor, η = 1, no momentum.
        for (x, w) in wa[0].iter().zip(&w0[0]) {
            assert!((x - (w + 0.6)).abs() < 1e-6, "{x}");
        }
        assert_eq!(wa, wb, "both regions restart from the same anchor");
        assert!(a.may_start_next() && !a.apply_outer_step(&mut wa));
    }

    #[test]
    fn steps_count_the_rounds_each_peer_was_behind_when_they_started() {
        let metas = metas();
        let names = names();
        let cfg = SyncConfig {
            max_staleness: 8,
            ..SyncConfig::default()
        };
        let mut a = RegionSync::new(&names[0], &peers(0), metas.clone(), cfg.clone(), 1);
        let mut b = RegionSync::new(&names[1], &peers(1), metas.clone(), cfg, 2);
        let mut wa: Vec<Vec<f32>> = metas.iter().map(|m| vec![1.0; m.numel]).collect();
        let wb = wa.clone();
        let send_all = send_all_fp32(metas.len());
        let delta: Vec<Vec<f32>> = metas.iter().map(|m| vec![0.01; m.numel]).collect();
        // b finishes one round; a trains rounds 1..=3 before it arrives, round 4 after.
        b.add_local_update(&delta);
        let to_a = b
            .finish_round(&wb, &[send_all.clone(), send_all.clone()])
            .unwrap();
        for round in 1..=4 {
            if round == 4 {
                for m in &to_a[0].messages {
                    a.receive(0, &m.to_bytes(), &mut wa).unwrap();
                }
            }
            a.note_step_start(round);
            a.add_local_update(&delta);
            a.finish_round(&wa, &[send_all.clone(), send_all.clone()])
                .unwrap();
        }
        // Behind b: 0, 1, 2, then 3 − 1 = 2 once its round 1 is in.
        let c = a.counters(0);
        assert_eq!(
            (c.steps_started, c.rounds_behind_sum, c.rounds_behind_max),
            (4, 5, 2)
        );
        assert_eq!(c.rounds_behind_mean(), 1.25);
        // r2 never sent anything: 0, 1, 2, 3.
        let c = a.counters(1);
        assert_eq!((c.rounds_behind_sum, c.rounds_behind_max), (6, 3));
        assert_eq!(b.counters(0).rounds_behind_mean(), 0.0, "no step started");
    }

    #[test]
    fn snapshot_serve_adopt_and_resume_keep_every_link_conserved() {
        let metas = metas();
        let cfg = SyncConfig {
            audit: true,
            ..SyncConfig::default()
        };
        let names = names();
        let mut a = RegionSync::new(&names[0], &peers(0), metas.clone(), cfg.clone(), 1);
        let mut b = RegionSync::new(&names[1], &peers(1), metas.clone(), cfg.clone(), 2);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut wa: Vec<Vec<f32>> = metas.iter().map(|m| vec![1.0; m.numel]).collect();
        let mut wb = wa.clone();
        for _ in 0..20 {
            for (s, w) in [(&mut a, &mut wa), (&mut b, &mut wb)] {
                let delta: Vec<Vec<f32>> = metas
                    .iter()
                    .map(|m| {
                        (0..m.numel)
                            .map(|_| rng.random_range(-0.05..0.05))
                            .collect()
                    })
                    .collect();
                s.add_local_update(&delta);
                let plans: Vec<LinkPlan> = (0..2).map(|_| random_plan(&mut rng, 3)).collect();
                s.finish_round(w, &plans).unwrap();
            }
        }
        // r2 restarts empty and takes r0's snapshot; when the notice arrives, r0 takes what
        // it served out of its residual for r2 (what came later stays), and r1 copies its
        // residual for r0 into its residual for r2.
        let mut c = RegionSync::new(&names[2], &peers(2), metas.clone(), cfg, 3);
        let served = a.residual(1).to_vec();
        let snap = a.snapshot_for(1, &wa, "m");
        assert_eq!(
            a.residual(1),
            &served[..],
            "nothing changes before the notice"
        );
        // An update after the snapshot, which the newcomer's weights lack.
        let late: Vec<Vec<f32>> = metas.iter().map(|m| vec![0.25; m.numel]).collect();
        a.add_local_update(&late);
        let mut wc = Vec::new();
        let notice = c.adopt(&snap, &mut wc).unwrap();
        assert_eq!(wc, wa);
        assert_eq!(c.round(), 20);
        assert_eq!(
            c.clock().complete(0),
            20,
            "all of r0's rounds are in the snapshot"
        );
        b.receive(1, &notice.to_bytes(), &mut wb).unwrap();
        assert_eq!(b.clock().complete(1), 20);
        assert_eq!(b.residual(1), b.residual(0));
        a.receive(1, &notice.to_bytes(), &mut wa).unwrap();
        // Only what came after the snapshot is left (to float rounding).
        for (r, l) in a.residual(1).iter().flatten().zip(late.iter().flatten()) {
            assert!((r - l).abs() < 1e-6, "{r} vs {l}");
        }
        // A resent notice is a duplicate, not a second reset.
        let before_b = b.residual(1).to_vec();
        assert!(matches!(
            b.receive(1, &notice.to_bytes(), &mut wb),
            Err(ReceiveError::Duplicate { .. })
        ));
        assert_eq!(b.residual(1), &before_b[..]);
        for (s, links) in [(&a, 2), (&b, 2)] {
            for l in 0..links {
                let e = s.conservation_error(l).unwrap();
                assert!(e < 1e-5, "{} link {l}: {e}", s.name());
            }
        }
        // Adopting a snapshot of another shape changes nothing.
        let mut bad = snap.clone();
        bad.weights.pop();
        let before = c.round();
        assert!(c.adopt(&bad, &mut wc).is_err());
        assert_eq!(c.round(), before);
    }
}
