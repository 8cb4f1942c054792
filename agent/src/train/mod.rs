//! The training engine: data sets, candle models, optimizers, schedules, evaluation,
//! checkpoints and the single-replica training loop.

pub mod batch;
pub mod checkpoint;
pub mod conv;
pub mod conv_pool;
pub mod cpu_buffers;
pub mod dataset;
pub mod device;
pub mod eval;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod manifest;
pub mod model;
mod norm;
#[cfg(test)]
mod op_checks;
pub mod optim;
pub mod pool;
pub mod resnet;
pub mod rng;
pub mod schedule;
pub mod trainer;
pub mod transformer;

pub use checkpoint::Checkpoint;
pub use dataset::{DataSplit, Dataset};
pub use device::DeviceSpec;
pub use eval::Evaluation;
pub use manifest::{Manifest, TensorKind, TensorSpec};
pub use model::{Model, ModelSpec};
pub use optim::{Optimizer, OptimizerSpec};
pub use schedule::{LrSchedule, evaluation_interval};
pub use trainer::{EpochReport, TrainConfig, Trainer};
