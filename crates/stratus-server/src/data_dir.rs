//! The data dir and the private files in it: directories created 0700 and files 0600 whatever
//! the process umask, the key files (`token.key`, `coap-psk.key`, `audit.key`), and the
//! start-up check that narrows what an older version or a loose umask left wider.
//!
//! The data dir holds the database (configurations, retained messages, secret hashes, the
//! audit log), the keys that sign tokens and key the audit chain, the admin secret and the
//! firmware images: nothing in it is for other users of the machine. At start
//! ([`secure`]) the server therefore makes the dir 0700 and every directory under it 0700 and
//! every file 0600, and says so on stderr (a warning) when it had to: files it cannot change
//! (owned by someone else) are named in the warning and left as they are.

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

/// A permission [`secure`] found wider than it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Widened {
    /// The file or directory.
    pub path: PathBuf,
    /// Its mode as found (permission bits).
    pub mode: u32,
    /// Why it could not be narrowed (`None`: it was).
    pub error: Option<String>,
}

/// What [`secure`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secured {
    /// The data dir itself, when it was wider than 0700.
    pub dir: Option<Widened>,
    /// Directories and files under it that were wider than 0700 / 0600.
    pub inside: Vec<Widened>,
}

/// Makes `data_dir` private: created 0700 when missing; when it exists, it and every directory
/// under it become 0700 and every file 0600 where they were wider (symbolic links are not
/// followed). Returns what was wider, for the caller to warn about.
pub fn secure(data_dir: &Path) -> std::io::Result<Secured> {
    let mut secured = Secured::default();
    if !data_dir.exists() {
        create_private_dir(data_dir)?;
        return Ok(secured);
    }
    let meta = std::fs::metadata(data_dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a directory", data_dir.display()),
        ));
    }
    secured.dir = narrow(data_dir, meta.permissions().mode(), DIR_MODE);
    let mut pending = vec![data_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path)?;
            let wanted = if meta.is_dir() {
                pending.push(path.clone());
                DIR_MODE
            } else if meta.is_file() {
                FILE_MODE
            } else {
                continue;
            };
            if let Some(widened) = narrow(&path, meta.permissions().mode(), wanted) {
                secured.inside.push(widened);
            }
        }
    }
    secured.inside.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(secured)
}

/// Sets `path` to `wanted` when `mode` grants anything to the group or others.
fn narrow(path: &Path, mode: u32, wanted: u32) -> Option<Widened> {
    let mode = mode & 0o7777;
    if mode & 0o077 == 0 {
        return None;
    }
    let error = std::fs::set_permissions(path, Permissions::from_mode(wanted))
        .err()
        .map(|e| e.to_string());
    Some(Widened {
        path: path.to_path_buf(),
        mode,
        error,
    })
}

/// Logs what [`secure`] found: one warning for the data dir, one for what was under it.
pub fn warn_about(data_dir: &Path, secured: &Secured) {
    if let Some(w) = &secured.dir {
        match &w.error {
            None => tracing::warn!(
                "data dir {} was mode {:04o}, open to other users; changed to 0700",
                data_dir.display(),
                w.mode
            ),
            Some(e) => tracing::warn!(
                "data dir {} is mode {:04o}, open to other users, and could not be changed \
                 to 0700: {e}",
                data_dir.display(),
                w.mode
            ),
        }
    }
    let (fixed, stuck): (Vec<&Widened>, Vec<&Widened>) =
        secured.inside.iter().partition(|w| w.error.is_none());
    if !fixed.is_empty() {
        tracing::warn!(
            "{} entries of data dir {} were open to other users; changed to 0600 (directories \
             0700): {}",
            fixed.len(),
            data_dir.display(),
            list(&fixed)
        );
    }
    if !stuck.is_empty() {
        tracing::warn!(
            "{} entries of data dir {} are open to other users and could not be changed: {}",
            stuck.len(),
            data_dir.display(),
            list(&stuck)
        );
    }
}

/// At most 10 paths with their modes (and errors), then how many more.
fn list(widened: &[&Widened]) -> String {
    let mut out: Vec<String> = widened
        .iter()
        .take(10)
        .map(|w| match &w.error {
            None => format!("{} ({:04o})", w.path.display(), w.mode),
            Some(e) => format!("{} ({:04o}: {e})", w.path.display(), w.mode),
        })
        .collect();
    if widened.len() > 10 {
        out.push(format!("and {} more", widened.len() - 10));
    }
    out.join(", ")
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

    #[test]
    fn secure_narrows_a_wide_data_dir_and_reports_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        assert_eq!(secure(&dir).unwrap(), Secured::default());
        assert_eq!(mode(&dir), 0o700);
        std::fs::create_dir_all(dir.join("firmware").join("tmp")).unwrap();
        std::fs::write(dir.join("stratus.db"), b"").unwrap();
        std::fs::write(dir.join("firmware").join("fw-1"), b"").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.join("link")).unwrap();
        for (p, m) in [
            (dir.clone(), 0o755),
            (dir.join("firmware"), 0o750),
            (dir.join("firmware").join("tmp"), 0o700),
            (dir.join("stratus.db"), 0o644),
            (dir.join("firmware").join("fw-1"), 0o600),
        ] {
            std::fs::set_permissions(&p, Permissions::from_mode(m)).unwrap();
        }
        let found = secure(&dir).unwrap();
        assert_eq!(
            found.dir,
            Some(Widened {
                path: dir.clone(),
                mode: 0o755,
                error: None
            })
        );
        let inside: Vec<(PathBuf, u32)> = found
            .inside
            .iter()
            .map(|w| (w.path.clone(), w.mode))
            .collect();
        assert_eq!(
            inside,
            [
                (dir.join("firmware"), 0o750),
                (dir.join("stratus.db"), 0o644)
            ]
        );
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("firmware")), 0o700);
        assert_eq!(mode(&dir.join("stratus.db")), 0o600);
        assert_eq!(
            secure(&dir).unwrap(),
            Secured::default(),
            "nothing left to narrow"
        );
        warn_about(&dir, &found);
    }
}
