//! The agent's checkpoint: weights, optimizer state, every per-peer residual, the mirror
//! clock, the policy's digest and state blob, and the messages not yet acknowledged by
//! peers. One file per region (`<checkpoint.dir>/<region>.ckpt`): magic, then zstd CBOR,
//! written to a temporary file, synced, and renamed over the old one, so a crash leaves
//! either the old checkpoint or the new one.

use crate::lan::TrainerState;
use crate::sync::region::SyncState;
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// First four bytes of a checkpoint file.
const MAGIC: [u8; 4] = *b"WGCK";
/// Format version. 2: the unacknowledged messages it holds are WAN protocol 2.
const FORMAT: u32 = 2;
/// Largest decompressed checkpoint accepted.
const MAX_BYTES: usize = 16 << 30;

/// Everything a region needs to resume its run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentCheckpoint {
    /// Format version.
    pub format: u32,
    /// Region name.
    pub region: String,
    /// Model manifest hash.
    pub manifest: String,
    /// Rounds in the run.
    pub total_rounds: u64,
    /// Digest of the policy active when it was taken.
    pub policy_digest: String,
    /// That policy's state blob.
    #[serde(with = "serde_bytes")]
    pub policy_state: Vec<u8>,
    /// WAN bytes sent so far.
    pub wan_sent: u64,
    /// The trainer.
    pub trainer: TrainerState,
    /// The WAN state.
    pub sync: SyncState,
    /// Per link, the messages peers had not acknowledged, in order.
    pub unacked: Vec<Vec<serde_bytes::ByteBuf>>,
    /// Written at a clean stop (SIGTERM or the end of the run), after intake was closed and
    /// drained. A periodic checkpoint is not clean: peers may have handed over messages
    /// after it, which a restart from it no longer has.
    #[serde(default)]
    pub clean: bool,
}

/// Where `region`'s checkpoint lives in `dir`.
pub fn path(dir: &Path, region: &str) -> PathBuf {
    dir.join(format!("{region}.ckpt"))
}

impl AgentCheckpoint {
    /// Writes atomically (see [`crate::atomic_file`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut cbor = Vec::new();
        ciborium::into_writer(self, &mut cbor).context("encoding the checkpoint")?;
        let body = zstd::bulk::compress(&cbor, 1).context("compressing the checkpoint")?;
        crate::atomic_file::write(path, &[&MAGIC, &body])
            .with_context(|| format!("writing checkpoint {}", path.display()))
    }

    /// Reads `path`; `None` if there is no checkpoint there. A damaged file is an error
    /// naming it (the agent does not start over silently).
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let damaged = |why: String| {
            anyhow::anyhow!(
                "checkpoint {} is damaged ({why}); move it away to start this region afresh",
                path.display()
            )
        };
        let Some(body) = bytes.strip_prefix(&MAGIC[..]) else {
            return Err(damaged("not a weightgrad checkpoint".into()));
        };
        let cbor = crate::sync::snapshot::decompress_within(body, MAX_BYTES)
            .map_err(|e| damaged(e.to_string()))?;
        // A checkpoint of another format is named as such, not reported as damaged because
        // its fields differ; its format is read on its own only when the whole does not
        // parse as this format (one pass over a large checkpoint in the usual case).
        #[derive(Deserialize)]
        struct FormatOnly {
            format: u32,
        }
        let parsed: Result<Self, _> = ciborium::from_reader(&cbor[..]);
        let format = match &parsed {
            Ok(ck) => ck.format,
            Err(e) => match ciborium::from_reader::<FormatOnly, _>(&cbor[..]) {
                Ok(FormatOnly { format }) if format != FORMAT => format,
                _ => return Err(damaged(e.to_string())),
            },
        };
        if format != FORMAT {
            bail!(
                "checkpoint {} has format {format}, this agent reads {FORMAT}",
                path.display()
            );
        }
        let ck = parsed.map_err(|e| damaged(e.to_string()))?;
        Ok(Some(ck))
    }

    /// Checks that it belongs to this region's run.
    pub fn check(
        &self,
        region: &str,
        manifest: &str,
        total_rounds: u64,
        path: &Path,
    ) -> Result<()> {
        ensure!(
            self.region == region,
            "checkpoint {} belongs to region {}, not {region}",
            path.display(),
            self.region
        );
        ensure!(
            self.manifest == manifest,
            "checkpoint {} is of another model (manifest {}); training.model or the data differ",
            path.display(),
            self.manifest
        );
        ensure!(
            self.total_rounds == total_rounds,
            "checkpoint {} is of a run of {} rounds, this configuration makes {total_rounds}",
            path.display(),
            self.total_rounds
        );
        Ok(())
    }

    /// The format version this build writes.
    pub fn current_format() -> u32 {
        FORMAT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_raw(path: &Path, value: &ciborium::Value) {
        let mut cbor = Vec::new();
        ciborium::into_writer(value, &mut cbor).unwrap();
        let body = zstd::bulk::compress(&cbor, 1).unwrap();
        std::fs::write(path, [&MAGIC[..], &body].concat()).unwrap();
    }

    #[test]
    fn a_checkpoint_of_another_format_is_refused_by_its_format() {
        let dir = tempfile::tempdir().unwrap();
        let file = path(dir.path(), "us-east");
        // A format 1 checkpoint: its fields need not match this build's.
        let old = ciborium::Value::Map(vec![
            ("format".into(), 1.into()),
            ("region".into(), "us-east".into()),
        ]);
        write_raw(&file, &old);
        let err = AgentCheckpoint::load(&file).unwrap_err().to_string();
        assert!(err.contains("has format 1, this agent reads 2"), "{err}");
        // This format with missing fields is damaged, and says so.
        let broken = ciborium::Value::Map(vec![("format".into(), FORMAT.into())]);
        write_raw(&file, &broken);
        let err = AgentCheckpoint::load(&file).unwrap_err().to_string();
        assert!(err.contains("is damaged"), "{err}");
        assert!(
            AgentCheckpoint::load(&dir.path().join("none.ckpt"))
                .unwrap()
                .is_none()
        );
    }
}
