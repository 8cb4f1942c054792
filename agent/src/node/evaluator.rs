//! Test-set evaluations beside training: the core hands a snapshot of the weights to a
//! thread of its own and goes on with the next round; finished evaluations come back in
//! the order they were handed over.
//!
//! An evaluation reads only its snapshot, so it changes neither the model nor the bytes;
//! what it records (the round, the moment, the WAN bytes sent) is taken when the snapshot
//! is, so the run's curve is the same as with evaluations between rounds, less the time
//! they held the rounds up. Where the agent trains with one compute thread (its share of a
//! host it shares with other agents) the thread runs at the lowest CPU priority, on the
//! time training leaves. At most [`Evaluator::MAX_QUEUED`] snapshots and the queue's bytes
//! ([`Evaluator::DEFAULT_QUEUE_BYTES`] in an agent) wait in memory; beyond that, handing
//! one over waits for the oldest to finish (and the round waits with it). The run's end
//! waits for every evaluation handed over.

use crate::train::{dataset::Dataset, eval::evaluate, model::Model};
use anyhow::{Result, anyhow};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The weights of one round and what the record of its evaluation says besides top-1.
#[derive(Debug, Clone)]
pub struct Snapshot<M> {
    /// The weights, manifest order.
    pub weights: Vec<Vec<f32>>,
    /// What the record keeps beside the result (the round, the moment, the bytes...).
    pub meta: M,
}

/// A finished evaluation: the snapshot's record and the result.
#[derive(Debug, Clone)]
pub struct Finished<M> {
    /// The record handed over with the snapshot.
    pub meta: M,
    /// Test top-1 and loss of the snapshot's weights.
    pub result: crate::train::Evaluation,
}

/// A thread evaluating snapshots in order; see the module documentation.
pub struct Evaluator<M> {
    jobs: Option<Sender<Snapshot<M>>>,
    done: Receiver<Result<Finished<M>>>,
    thread: Option<JoinHandle<()>>,
    /// Bytes of each snapshot handed over and not yet returned, oldest first (they come
    /// back in order).
    queued: VecDeque<usize>,
    /// Their sum.
    queued_bytes: usize,
    max_queue_bytes: usize,
}

impl<M: Send + 'static> Evaluator<M> {
    /// Snapshot bytes that may wait at once (at least one snapshot always may).
    pub const DEFAULT_QUEUE_BYTES: usize = 64 << 20;
    /// Snapshots that may wait at once, whatever their size: the run's end waits for them.
    pub const MAX_QUEUED: usize = 32;

    /// Starts the thread: it imports each snapshot into `model` and evaluates it on
    /// `test`. `low_priority` runs it at the lowest CPU priority (Linux; elsewhere a no-op).
    pub fn start(
        model: Model,
        test: Arc<Dataset>,
        low_priority: bool,
        max_queue_bytes: usize,
    ) -> Result<Self> {
        let (jobs, inbox) = channel::<Snapshot<M>>();
        let (outbox, done) = channel();
        let thread = std::thread::Builder::new()
            .name("weightgrad-evaluate".into())
            .spawn(move || {
                if low_priority {
                    lower_this_threads_priority();
                }
                for snapshot in inbox {
                    let result = model
                        .import(&snapshot.weights)
                        .and_then(|()| evaluate(&model, &test))
                        .map(|result| Finished {
                            meta: snapshot.meta,
                            result,
                        });
                    if outbox.send(result).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            queued: VecDeque::new(),
            queued_bytes: 0,
            max_queue_bytes,
        })
    }

    /// Hands `snapshot` over. Returns the evaluations that finished meanwhile (in order)
    /// and how long it waited for room, which is zero unless the queue was full.
    pub fn submit(&mut self, snapshot: Snapshot<M>) -> Result<(Vec<Finished<M>>, Duration)> {
        let bytes = snapshot_bytes(&snapshot.weights);
        let mut finished = self.poll()?;
        let began = Instant::now();
        while !self.queued.is_empty()
            && (self.queued_bytes + bytes > self.max_queue_bytes
                || self.queued.len() >= Self::MAX_QUEUED)
        {
            finished.push(self.wait_one()?);
        }
        let waited = began.elapsed();
        self.jobs
            .as_ref()
            .ok_or_else(|| anyhow!("the evaluator was finished"))?
            .send(snapshot)
            .map_err(|_| self.stopped())?;
        self.queued.push_back(bytes);
        self.queued_bytes += bytes;
        Ok((finished, waited))
    }

    /// The evaluations finished so far, in order, without waiting.
    pub fn poll(&mut self) -> Result<Vec<Finished<M>>> {
        let mut finished = Vec::new();
        while let Ok(result) = self.done.try_recv() {
            finished.push(self.returned(result)?);
        }
        Ok(finished)
    }

    /// Waits for every evaluation handed over and stops the thread; returns them in order.
    pub fn finish(mut self) -> Result<Vec<Finished<M>>> {
        self.jobs = None;
        let mut finished = Vec::new();
        while !self.queued.is_empty() {
            finished.push(self.wait_one()?);
        }
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow!("the evaluation thread panicked"))?;
        }
        Ok(finished)
    }

    fn wait_one(&mut self) -> Result<Finished<M>> {
        let result = self.done.recv().map_err(|_| self.stopped())?;
        self.returned(result)
    }

    fn returned(&mut self, result: Result<Finished<M>>) -> Result<Finished<M>> {
        self.queued_bytes -= self.queued.pop_front().unwrap_or(0);
        result.map_err(|e| e.context("evaluating a snapshot on the test set"))
    }

    fn stopped(&mut self) -> anyhow::Error {
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(_)) => anyhow!("the evaluation thread panicked"),
            _ => anyhow!("the evaluation thread stopped"),
        }
    }
}

fn snapshot_bytes(weights: &[Vec<f32>]) -> usize {
    weights.iter().map(|w| 4 * w.len()).sum()
}

/// Gives the calling thread the lowest CPU priority (nice 19), so it runs on the time the
/// others leave; a refusal leaves it as it was.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read and set the calling thread's priority.
    unsafe {
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) != 0 {
            tracing::debug!("could not lower the evaluation thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{ModelSpec, dataset::embedded_digits};
    use candle_core::Device;

    fn model_and_test() -> (Model, Arc<Dataset>) {
        let data = embedded_digits().unwrap();
        let spec = ModelSpec::Mlp { hidden: vec![8] };
        let model = Model::new(&spec, &data.test.sample_shape, 10, 3, &Device::Cpu).unwrap();
        (model, Arc::new(data.test))
    }

    fn weights_with_seed(seed: u64) -> Vec<Vec<f32>> {
        let data = embedded_digits().unwrap();
        let spec = ModelSpec::Mlp { hidden: vec![8] };
        Model::new(&spec, &data.test.sample_shape, 10, seed, &Device::Cpu)
            .unwrap()
            .export()
            .unwrap()
    }

    #[test]
    fn evaluations_come_back_in_order_with_the_results_of_their_own_snapshots() {
        let (model, test) = model_and_test();
        let expected: Vec<f64> = (0..4u64)
            .map(|s| {
                model.import(&weights_with_seed(s)).unwrap();
                evaluate(&model, &test).unwrap().accuracy
            })
            .collect();
        // Room for one snapshot: every hand-over after the first waits for the last.
        let one = snapshot_bytes(&weights_with_seed(0));
        let mut evaluator = Evaluator::start(model, test, true, one).unwrap();
        let mut got = Vec::new();
        for s in 0..4u64 {
            let (finished, _) = evaluator
                .submit(Snapshot {
                    weights: weights_with_seed(s),
                    meta: s,
                })
                .unwrap();
            got.extend(finished);
        }
        got.extend(evaluator.finish().unwrap());
        let metas: Vec<u64> = got.iter().map(|f| f.meta).collect();
        assert_eq!(metas, [0, 1, 2, 3]);
        let accuracies: Vec<f64> = got.iter().map(|f| f.result.accuracy).collect();
        assert_eq!(accuracies, expected);
        assert!(
            expected.windows(2).any(|w| w[0] != w[1]),
            "the snapshots must differ for the order to mean anything: {expected:?}"
        );
    }

    #[test]
    fn a_snapshot_that_does_not_fit_the_model_is_an_error_naming_it() {
        let (model, test) = model_and_test();
        let mut evaluator = Evaluator::start(model, test, false, usize::MAX).unwrap();
        evaluator
            .submit(Snapshot {
                weights: vec![vec![0.0; 3]],
                meta: 0u64,
            })
            .unwrap();
        let err = evaluator.finish().map(|_| ()).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("evaluating a snapshot") && message.contains("tensors given"),
            "{message}"
        );
    }
}
