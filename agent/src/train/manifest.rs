//! The model manifest: ordered tensor names, shapes and kinds, and a hash that identifies them.
//!
//! Two replicas can exchange updates only if their manifest hashes agree.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What role a tensor plays in the model; policies may treat kinds differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TensorKind {
    /// A weight matrix or convolution kernel.
    Weight,
    /// A bias vector.
    Bias,
    /// A lookup table (token or position embedding); a step touches only the rows it reads.
    Embedding,
    /// An attention projection (queries, keys and values, or the output).
    Attention,
    /// A normalization's gain or shift.
    Norm,
}

impl TensorKind {
    /// The role a policy sees for this kind of tensor.
    pub fn role(self) -> weightgrad_sdk::TensorRole {
        use weightgrad_sdk::TensorRole;
        match self {
            Self::Weight => TensorRole::Weight,
            Self::Bias => TensorRole::Bias,
            Self::Embedding => TensorRole::Embedding,
            Self::Attention => TensorRole::Attention,
            Self::Norm => TensorRole::Norm,
        }
    }
}

/// One trainable tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Stable name, e.g. `fc1.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Role of the tensor.
    pub kind: TensorKind,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The ordered list of a model's trainable tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Model family and configuration, e.g. `mlp[64-128-10]`.
    pub model: String,
    /// Tensors in the order they are stored, updated and sent.
    pub tensors: Vec<TensorSpec>,
}

impl Manifest {
    /// Total number of trainable scalars.
    pub fn params(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// Hex SHA-256 over the tensor names, shapes and kinds (not the model label).
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for t in &self.tensors {
            h.update((t.name.len() as u64).to_le_bytes());
            h.update(t.name.as_bytes());
            h.update((t.shape.len() as u64).to_le_bytes());
            for d in &t.shape {
                h.update((*d as u64).to_le_bytes());
            }
            h.update([t.kind as u8]);
        }
        hex::encode(h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            kind: TensorKind::Weight,
        }
    }

    #[test]
    fn hash_depends_on_names_and_shapes_only() {
        let a = Manifest {
            model: "a".into(),
            tensors: vec![spec("w", &[2, 3])],
        };
        let mut b = a.clone();
        b.model = "b".into();
        assert_eq!(a.hash(), b.hash());
        b.tensors[0].shape = vec![3, 2];
        assert_ne!(a.hash(), b.hash());
        let mut c = a.clone();
        c.tensors[0].name = "v".into();
        assert_ne!(a.hash(), c.hash());
        assert_eq!(a.params(), 6);
    }
}
