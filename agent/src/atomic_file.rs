//! Writing a file so that a reader (or a restart after a crash) finds the old contents or the
//! new, never part of either: a hidden temporary file beside it, fsync, rename over it, then
//! fsync of the directory so the rename itself is durable.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary file [`write`] uses for `path`: `.NAME.tmp` in the same directory.
pub fn temporary(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    directory(path).join(format!(".{name}.tmp"))
}

fn directory(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `parts`, one after the other, to `path` atomically, creating its directory.
pub fn write(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let dir = directory(path);
    std::fs::create_dir_all(dir)?;
    let tmp = temporary(path);
    let mut f = std::fs::File::create(&tmp)?;
    for part in parts {
        f.write_all(part)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.bin");
        write(&path, &[b"old"]).unwrap();
        write(&path, &[b"ne", b"w"]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!temporary(&path).exists());
        assert_eq!(temporary(&path), dir.path().join("sub/.state.bin.tmp"));
    }
}
