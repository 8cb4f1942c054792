//! Logs an operator can read when a policy keeps failing: the first failure of each kind
//! for a policy is logged with its reason; repeats are counted and summarised at most once
//! per interval. Sans-IO: the caller passes the time and emits the lines.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How often repeats are summarised at most.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// What to log after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureLine {
    /// The first failure of this kind for this policy: its reason.
    First {
        /// Failure kind.
        kind: &'static str,
        /// One-line reason.
        reason: String,
    },
    /// Failures since the last line, by kind, over `over`.
    Repeated {
        /// Counts by kind.
        counts: BTreeMap<&'static str, u64>,
        /// Time they were counted over.
        over: Duration,
    },
}

/// Which failures have been logged, and the repeats not yet summarised.
#[derive(Debug, Clone)]
pub struct FailureLog {
    interval: Duration,
    seen: BTreeSet<(String, &'static str)>,
    unreported: BTreeMap<&'static str, u64>,
    since: Option<Instant>,
}

impl Default for FailureLog {
    fn default() -> Self {
        Self::new(SUMMARY_INTERVAL)
    }
}

impl FailureLog {
    /// Summaries at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: BTreeSet::new(),
            unreported: BTreeMap::new(),
            since: None,
        }
    }

    /// A failure of `kind` by the policy with `digest` at `now`: the line to log, if any.
    pub fn record(
        &mut self,
        digest: &str,
        kind: &'static str,
        reason: &str,
        now: Instant,
    ) -> Option<FailureLine> {
        if self.seen.insert((digest.to_string(), kind)) {
            return Some(FailureLine::First {
                kind,
                reason: reason.to_string(),
            });
        }
        *self.unreported.entry(kind).or_default() += 1;
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= self.interval {
            return self.flush(now);
        }
        None
    }

    /// The repeats not yet summarised (when the policy is rolled back, say).
    pub fn flush(&mut self, now: Instant) -> Option<FailureLine> {
        let since = self.since.take()?;
        let counts = std::mem::take(&mut self.unreported);
        (!counts.is_empty()).then(|| FailureLine::Repeated {
            counts,
            over: now.duration_since(since),
        })
    }
}

/// The first line of a failure's text, without a wasm backtrace (which goes to the debug
/// log only).
pub fn short_reason(text: &str) -> String {
    let head = text.split("wasm backtrace:").next().unwrap_or(text);
    let line = head
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or(head.trim());
    line.trim_end_matches(':').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_each_kind_is_logged_and_repeats_are_summarised_at_most_per_interval() {
        let t0 = Instant::now();
        let mut log = FailureLog::new(Duration::from_secs(10));
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(matches!(
            log.record("d1", "trap", "trapped: boom", at(0)),
            Some(FailureLine::First { kind: "trap", .. })
        ));
        // Repeats within the interval: counted, not logged.
        for s in 1..=9 {
            assert_eq!(log.record("d1", "trap", "trapped: boom", at(s)), None);
        }
        // Another kind is logged at once.
        assert!(matches!(
            log.record("d1", "timeout", "ran past", at(9)),
            Some(FailureLine::First {
                kind: "timeout",
                ..
            })
        ));
        // The interval is over: one summary of everything since.
        match log.record("d1", "trap", "trapped: boom", at(12)) {
            Some(FailureLine::Repeated { counts, over }) => {
                assert_eq!(counts.get("trap"), Some(&10));
                assert_eq!(over, Duration::from_secs(11));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(log.flush(at(13)), None);
        // Another policy's first failure of a kind is logged again.
        assert!(log.record("d2", "trap", "x", at(13)).is_some());
        // A thousand failures in one interval make one line.
        let lines = (0..1000)
            .filter_map(|i| log.record("d2", "trap", "x", at(14) + Duration::from_millis(i)))
            .count();
        assert_eq!(lines, 0);
        assert!(matches!(
            log.flush(at(15)),
            Some(FailureLine::Repeated { .. })
        ));
    }

    #[test]
    fn reasons_lose_their_backtrace() {
        let text = "trapped: error while executing at wasm backtrace:\n    0: 0x1a - <unknown>!f";
        assert_eq!(short_reason(text), "trapped: error while executing at");
        assert_eq!(
            short_reason("ran past its 10ms deadline"),
            "ran past its 10ms deadline"
        );
        assert_eq!(
            short_reason("trapped: wasm trap: unreachable\nwasm backtrace:\n 0: x"),
            "trapped: wasm trap: unreachable"
        );
    }
}
