//! Files only their owner can read. The hub (bundles with Secret data, git caches, keys) and the
//! agent (identity, bundle cache) both keep secrets on disk: their processes create everything
//! owner-only (umask 077), and their data directories are made so at start, also when an earlier
//! version left them readable.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// New files and directories of this process: owner-only (0600 / 0700).
pub fn owner_only_umask() {
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
}

/// Takes group and world permissions off `dir` and everything under it (symlinks are left alone;
/// nothing outside `dir` is touched).
pub fn restrict_tree(dir: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7700))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            restrict_tree(&entry?.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_and_directory_becomes_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let sub = dir.join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("f"), "x").unwrap();
        for p in [dir.join("a"), sub.clone(), sub.join("f")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        restrict_tree(dir).unwrap();
        for p in [dir.join("a"), sub.clone(), sub.join("f")] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        }
    }
}
