//! Checkpoints: named `f32` tensors plus string metadata in a safetensors file,
//! written atomically (temporary file, fsync, rename).

use anyhow::{Context, Result, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One stored tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// The contents of a checkpoint file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    /// Tensors by name.
    pub tensors: BTreeMap<String, StoredTensor>,
    /// Free-form metadata (JSON documents by key).
    pub metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Adds a tensor.
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) {
        self.tensors
            .insert(name.into(), StoredTensor { shape, values });
    }

    /// Takes a tensor out, checking its shape; `origin` names the file in errors.
    pub fn take(&mut self, name: &str, shape: &[usize], origin: &Path) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .remove(name)
            .with_context(|| format!("{}: checkpoint has no tensor {name:?}", origin.display()))?;
        if t.shape != shape {
            bail!(
                "{}: tensor {name:?} has shape {:?}, expected {shape:?}",
                origin.display(),
                t.shape
            );
        }
        Ok(t.values)
    }

    /// Metadata value by key; `origin` names the file in errors.
    pub fn meta(&self, key: &str, origin: &Path) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("{}: checkpoint has no {key:?} metadata", origin.display()))
    }

    /// Serialises to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let raw = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (n.clone(), t.shape.clone(), raw)
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(n, s, raw)| Ok((n.as_str(), TensorView::new(Dtype::F32, s.clone(), raw)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        Ok(safetensors::serialize(views, Some(meta))?)
    }

    /// Parses safetensors bytes; `origin` names the file in errors.
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .with_context(|| format!("{}: not a valid safetensors checkpoint", origin.display()))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .with_context(|| format!("{}: unreadable checkpoint header", origin.display()))?;
        let mut out = Checkpoint {
            metadata: header
                .metadata()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            ..Default::default()
        };
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                bail!(
                    "{}: tensor {name:?} has dtype {:?}; checkpoints hold f32",
                    origin.display(),
                    view.dtype()
                );
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.insert(name, view.shape().to_vec(), values);
        }
        Ok(out)
    }

    /// Writes atomically (see [`crate::atomic_file`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        crate::atomic_file::write(path, &[&bytes])
            .with_context(|| format!("cannot write checkpoint {}", path.display()))?;
        Ok(())
    }

    /// Reads a checkpoint file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        Self::from_bytes(&bytes, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ck.safetensors");
        let mut ck = Checkpoint::default();
        ck.insert("a", vec![2, 2], vec![1.0, -2.0, 3.5, 0.0]);
        ck.metadata.insert("k".into(), "v".into());
        ck.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back, ck);
        assert!(!dir.path().join("sub/.ck.safetensors.tmp").exists());
    }

    #[test]
    fn corrupted_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let mut ck = Checkpoint::default();
        ck.insert("a", vec![4], vec![1.0; 4]);
        let bytes = ck.to_bytes().unwrap();
        for bad in [
            &bytes[..bytes.len() - 3],
            &bytes[..5],
            b"garbage!garbage!".as_slice(),
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = format!("{:#}", Checkpoint::load(&path).unwrap_err());
            assert!(err.contains("ck.safetensors"), "{err}");
        }
        let mut ok = Checkpoint::from_bytes(&bytes, &path).unwrap();
        let err = ok.take("a", &[2, 2], &path).unwrap_err().to_string();
        assert!(err.contains("has shape [4], expected [2, 2]"), "{err}");
        let err = ok.take("b", &[4], &path).unwrap_err().to_string();
        assert!(err.contains("no tensor \"b\""), "{err}");
    }
}
