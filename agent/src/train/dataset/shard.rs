//! Deterministic partitioning of a data set across regions and workers.

use crate::train::rng::seeded_rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// How samples are dealt out to shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ShardStrategy {
    /// Shuffle, then deal contiguous equal parts: every shard sees every class.
    #[default]
    Iid,
    /// Sort by label (ties shuffled), then deal contiguous parts: each shard sees few classes.
    LabelSkew,
}

impl std::str::FromStr for ShardStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iid" => Ok(Self::Iid),
            "label-skew" | "non-iid" => Ok(Self::LabelSkew),
            _ => Err(format!(
                "unknown shard strategy {s:?}; expected iid or label-skew"
            )),
        }
    }
}

/// How a run deals its data: `regions` regions of `workers` workers each, one shard per
/// worker, `batch_size` samples per worker per step. Every region of a run computes the
/// same layout, so each knows every region's share and the run's round count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionLayout {
    /// Regions sharing the data set.
    pub regions: usize,
    /// Workers per region.
    pub workers: usize,
    /// Samples per worker per step.
    pub batch_size: usize,
    /// How samples are dealt.
    pub strategy: ShardStrategy,
    /// Seed of the deal.
    pub seed: u64,
}

impl RegionLayout {
    /// The sample indices of each of `region`'s workers.
    pub fn worker_shards(&self, labels: &[u32], region: usize) -> Vec<Vec<usize>> {
        let total = self.regions * self.workers;
        (0..self.workers)
            .map(|k| {
                shard_indices(
                    labels,
                    total,
                    region * self.workers + k,
                    self.strategy,
                    self.seed,
                )
            })
            .collect()
    }

    /// Rounds per epoch: the largest region's steps over its share, so every region runs
    /// the same number of rounds.
    pub fn steps_per_epoch(&self, labels: &[u32]) -> u64 {
        let per_step = (self.workers * self.batch_size).max(1);
        (0..self.regions)
            .map(|r| {
                let samples: usize = self.worker_shards(labels, r).iter().map(Vec::len).sum();
                samples.div_ceil(per_step)
            })
            .max()
            .unwrap_or(1)
            .max(1) as u64
    }
}

/// The sample indices of shard `shard` out of `shards`, for a data set with `labels`.
///
/// The shards partition `0..labels.len()` exactly; the result depends only on the inputs.
pub fn shard_indices(
    labels: &[u32],
    shards: usize,
    shard: usize,
    strategy: ShardStrategy,
    seed: u64,
) -> Vec<usize> {
    assert!(shards > 0 && shard < shards, "shard {shard} of {shards}");
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.shuffle(&mut seeded_rng(seed, "shard", 0));
    if strategy == ShardStrategy::LabelSkew {
        // Stable sort keeps the shuffled order within each class.
        order.sort_by_key(|&i| labels[i]);
    }
    let n = labels.len();
    let start = shard * n / shards;
    let end = (shard + 1) * n / shards;
    order[start..end].to_vec()
}

/// Splits `0..n` into (train, test) with about `test_fraction` of the rows held out.
pub(crate) fn split_holdout(n: usize, test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut seeded_rng(seed, "holdout", 0));
    let test = ((n as f64) * test_fraction.clamp(0.0, 1.0)).round() as usize;
    let test = test.clamp(usize::from(n > 1), n.saturating_sub(1));
    let (te, tr) = order.split_at(test);
    (tr.to_vec(), te.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn labels(n: usize) -> Vec<u32> {
        (0..n).map(|i| (i % 10) as u32).collect()
    }

    #[test]
    fn shards_partition_the_data_for_both_strategies() {
        let l = labels(1003);
        for strategy in [ShardStrategy::Iid, ShardStrategy::LabelSkew] {
            let mut seen = HashSet::new();
            for s in 0..7 {
                for i in shard_indices(&l, 7, s, strategy, 42) {
                    assert!(seen.insert(i), "index {i} dealt twice");
                }
            }
            assert_eq!(seen.len(), l.len());
        }
    }

    #[test]
    fn sharding_is_deterministic_and_seed_dependent() {
        let l = labels(500);
        let a = shard_indices(&l, 3, 1, ShardStrategy::Iid, 7);
        assert_eq!(a, shard_indices(&l, 3, 1, ShardStrategy::Iid, 7));
        assert_ne!(a, shard_indices(&l, 3, 1, ShardStrategy::Iid, 8));
    }

    #[test]
    fn label_skew_concentrates_classes() {
        let l = labels(1000);
        let classes = |s| {
            shard_indices(&l, 5, s, ShardStrategy::LabelSkew, 1)
                .iter()
                .map(|&i| l[i])
                .collect::<HashSet<_>>()
                .len()
        };
        let iid: HashSet<_> = shard_indices(&l, 5, 0, ShardStrategy::Iid, 1)
            .iter()
            .map(|&i| l[i])
            .collect();
        assert_eq!(iid.len(), 10);
        for s in 0..5 {
            assert!(classes(s) <= 3, "shard {s} sees {} classes", classes(s));
        }
    }

    #[test]
    fn holdout_keeps_both_sides_non_empty() {
        let (tr, te) = split_holdout(5, 0.0, 1);
        assert_eq!((tr.len(), te.len()), (4, 1));
        let (tr, te) = split_holdout(10, 0.3, 1);
        assert_eq!((tr.len(), te.len()), (7, 3));
    }

    #[test]
    fn a_layout_gives_every_region_its_workers_shards_and_one_round_count() {
        let labels: Vec<u32> = (0..103).map(|i| i % 10).collect();
        let layout = RegionLayout {
            regions: 3,
            workers: 2,
            batch_size: 4,
            strategy: ShardStrategy::Iid,
            seed: 7,
        };
        let mut all: Vec<usize> = (0..3)
            .flat_map(|r| layout.worker_shards(&labels, r).into_iter().flatten())
            .collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..103).collect::<Vec<_>>(),
            "the workers' shards partition the set"
        );
        // 103 samples over 3 regions: at most 35 per region, 8 per step -> 5 steps.
        assert_eq!(layout.steps_per_epoch(&labels), 5);
    }
}
