//! The data dir's private files: directories created 0700 and files 0600 whatever the process
//! umask, and the key files (`token.key`, `coap-psk.key`).

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// The mode of the data dir and every directory in it.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file in the data dir.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and any missing parent, each new one with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Writes `data` to `path` (created, or truncated) readable by the owner only, and syncs it;
/// a missing parent directory is created 0700.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    // A file that existed keeps its mode through `open`: narrow it too.
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    f.write_all(data)?;
    f.sync_all()
}

/// Replaces `path` with `data` atomically (a private temporary file renamed over it): a crash
/// leaves the old content or the new one, never a part.
pub fn replace_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write_private(&tmp, data)?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a key of at least 32 bytes from `path`.
pub fn read_key(path: &Path) -> std::io::Result<Vec<u8>> {
    let key = std::fs::read(path)?;
    if key.len() < 32 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is shorter than 32 bytes", path.display()),
        ));
    }
    Ok(key)
}

/// 32 random bytes from the operating system's generator.
pub fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

/// Reads the key at `path`, creating it (32 random bytes, mode 0600) on first start.
pub fn load_or_create_key(path: &Path) -> std::io::Result<Vec<u8>> {
    match read_key(path) {
        Ok(key) => return Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let key = random_key();
    write_private(path, &key)?;
    Ok(key.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn private_files_and_dirs_ignore_the_umask() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a").join("b").join("token.key");
        write_private(&file, b"x").unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        assert_eq!(mode(&tmp.path().join("a").join("b")), 0o700);
        // An existing wider file is narrowed when rewritten.
        std::fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        write_private(&file, b"y").unwrap();
        assert_eq!(mode(&file), 0o600);
        replace_private(&file, b"z").unwrap();
        assert_eq!(
            (mode(&file), std::fs::read(&file).unwrap()),
            (0o600, b"z".to_vec())
        );
        let key = load_or_create_key(&tmp.path().join("k")).unwrap();
        assert_eq!(key.len(), 32);
        assert_eq!(load_or_create_key(&tmp.path().join("k")).unwrap(), key);
        std::fs::write(tmp.path().join("short"), b"abc").unwrap();
        assert!(load_or_create_key(&tmp.path().join("short")).is_err());
    }
}
