//! The audit log's server side: appending from places that must not wait for it, the key of
//! the chain (`DATA_DIR/audit.key`) and the exported head (`DATA_DIR/audit.head`).
//!
//! ## Appending
//! Admin changes append their entry in the same store job as the change; [`record`] appends
//! one without waiting where the change was not a store job of its own (a rule deleted, an
//! alarm acknowledged). Failed authentications are not appended one by one: [`failures`]
//! aggregates them per source, identity and minute, and writes each minute's as one batch
//! beside the chain, with a retention.
//!
//! ## The key: `audit.key`
//! Every entry's hash is an HMAC-SHA-256 under a 32-byte key that is not in the database
//! (`stratus_store::audit` has the encoding), so whoever can write `stratus.db` but not read
//! the key cannot recompute the chain after changing it. The file is the 32 random bytes
//! followed by the *keyed-from* seq (8 bytes, big-endian): the first seq appended after the key
//! was made. A data dir whose log predates keying gets its key at the first start of this
//! version, keyed from the seq after its last entry; the older entries keep their unkeyed
//! SHA-256 chain and still verify, and nothing unkeyed is accepted from keyed-from on. The file
//! is created 0600 ([`open_audit_key`]); back it up with the database, since without it the
//! keyed entries cannot be verified.
//!
//! ## The head: `audit.head`
//! A chain cannot show that its newest entries were deleted. Every `[audit]
//! head_interval_secs` (and at shutdown) [`AuditHeads`] checks the entries appended since the
//! last head it wrote and, when the log grew, writes the new head: `SEQ:HASH` on the first
//! line, `hmac-sha256 MAC` (the head's MAC under the key) on the second. It also logs it (info,
//! `audit head SEQ:HASH`), so that the head reaches wherever the logs are shipped.
//! `stratus audit verify` fails when the log ends before `audit.head` or any head it is given
//! (`--head SEQ:HASH`, `--head-file FILE`); `stratus audit head` prints the current head for an
//! operator to keep.
//!
//! What this does not cover: someone who can write the whole data dir holds the key and the
//! head file too, and can rewrite the log, recompute every MAC and write a matching head. Only
//! heads kept off the machine (the shipped logs, a note of `stratus audit head`) show that; a
//! head kept elsewhere is the defence against that attacker, and it shows a change up to the
//! head's seq only.

pub mod failures;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value as Json;
use stratus_store::{
    AuditCheck, AuditHead, AuditKey, AuditStore, AuditVerdict, BrokenLink, NewAuditEntry,
    SqliteStore, StoreError, StoreHandle,
};
use tokio::sync::watch;

use crate::data_dir;

/// The key file under the data dir.
pub const AUDIT_KEY_FILE: &str = "audit.key";
/// The head file under the data dir.
pub const AUDIT_HEAD_FILE: &str = "audit.head";
/// Default of `[audit] head_interval_secs`.
pub const DEFAULT_HEAD_INTERVAL_SECS: u64 = 10;

/// A key or head file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuditFileError {
    /// Reading or writing it failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Its content is not what Stratus writes.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A head file whose MAC does not verify under the key: it was altered, or it belongs
    /// to another key.
    #[error(
        "{}: the head's MAC does not verify under the audit key (the file was altered or \
         belongs to another key)",
        path.display()
    )]
    Forged {
        /// The file.
        path: PathBuf,
    },
    /// Reading the log to create the key failed.
    #[error("reading the audit log: {0}")]
    Store(#[from] StoreError),
}

impl AuditFileError {
    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AuditFileError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AuditFileError + '_ {
    move |source| AuditFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads an audit key file: 32 bytes of secret, then the keyed-from seq (8 bytes,
/// big-endian; a file of the 32 bytes alone is keyed from seq 1).
pub fn read_audit_key(path: &Path) -> Result<AuditKey, AuditFileError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let invalid = |reason: String| AuditFileError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let keyed_from = match bytes.len() {
        32 => 1,
        40 => {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&bytes[32..]);
            u64::from_be_bytes(seq)
        }
        n => {
            return Err(invalid(format!(
                "an audit key file is 32 or 40 bytes long, not {n}"
            )))
        }
    };
    AuditKey::new(&bytes[..32], keyed_from).map_err(|e| invalid(e.to_string()))
}

/// The audit key of `data_dir`, created on first start (mode 0600) keyed from the seq after
/// the last entry of the log in `DATA_DIR/stratus.db` (1 for a new or empty log).
pub fn open_audit_key(data_dir: &Path) -> Result<AuditKey, AuditFileError> {
    let path = data_dir.join(AUDIT_KEY_FILE);
    match read_audit_key(&path) {
        Err(e) if e.is_not_found() => {}
        other => return other,
    }
    let db = data_dir.join(crate::persist::DATABASE_FILE);
    let store = SqliteStore::open(&db)?;
    let last = store.audit_len()?;
    if let AuditVerdict::Broken(link) = store.verify_audit()? {
        // Keyed entries whose key is lost, or an altered log: both stay visible as broken.
        tracing::error!(
            "{} is missing and the audit log does not verify without it ({link}); a new key \
             applies from seq {}",
            path.display(),
            last + 1
        );
    }
    drop(store);
    let keyed_from = last + 1;
    let secret = data_dir::random_key();
    let mut file = secret.to_vec();
    file.extend_from_slice(&keyed_from.to_be_bytes());
    data_dir::replace_private(&path, &file).map_err(io_error(&path))?;
    if last > 0 {
        tracing::info!(
            "created {}: the audit log is keyed from seq {keyed_from}; its {last} older entries \
             keep their unkeyed SHA-256 chain",
            path.display()
        );
    }
    AuditKey::new(&secret, keyed_from).map_err(StoreError::into)
}

/// A head file's content: the head and, when written by the server, its MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadFile {
    /// The head.
    pub head: AuditHead,
    /// `hmac-sha256` line's MAC, hex.
    pub mac: Option<String>,
}

impl HeadFile {
    /// The text of a head file for `head`, MACed under `key`.
    pub fn text(head: &AuditHead, key: &AuditKey) -> String {
        format!("{head}\nhmac-sha256 {}\n", head.mac(key))
    }

    /// Parses a head file: `SEQ:HASH` on the first line, optionally `hmac-sha256 MAC` on the
    /// second (an operator's own note of a head has no MAC).
    pub fn parse(text: &str) -> Result<HeadFile, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let head = lines
            .next()
            .ok_or_else(|| "empty; a head file starts with SEQ:HASH".to_string())?
            .parse::<AuditHead>()
            .map_err(|e| e.to_string())?;
        let mac = match lines.next() {
            None => None,
            Some(line) => match line.strip_prefix("hmac-sha256 ") {
                Some(mac) => Some(mac.trim().to_string()),
                None => return Err(format!("unexpected line {line:?} after the head")),
            },
        };
        if let Some(line) = lines.next() {
            return Err(format!("unexpected line {line:?}"));
        }
        Ok(HeadFile { head, mac })
    }

    /// Reads the head file at `path`; a MAC, when present (required with `need_mac`), must
    /// verify under `key`.
    pub fn read(path: &Path, key: &AuditKey, need_mac: bool) -> Result<AuditHead, AuditFileError> {
        let text = std::fs::read_to_string(path).map_err(io_error(path))?;
        let file = HeadFile::parse(&text).map_err(|reason| AuditFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        match &file.mac {
            Some(mac) if file.head.mac_verifies(key, mac) => Ok(file.head),
            None if !need_mac => Ok(file.head),
            _ => Err(AuditFileError::Forged {
                path: path.to_path_buf(),
            }),
        }
    }
}

/// The head exporter: verifies what was appended since the last head it wrote and writes the
/// new head to `DATA_DIR/audit.head` (see the module docs).
pub struct AuditHeads {
    store: StoreHandle,
    key: AuditKey,
    path: PathBuf,
    state: tokio::sync::Mutex<HeadState>,
}

#[derive(Default)]
struct HeadState {
    /// The last head verified and written (or read back at start).
    trusted: Option<AuditHead>,
    /// The last failure logged: a broken log is reported once, not at every tick.
    reported: Option<BrokenLink>,
}

impl AuditHeads {
    /// The exporter of `data_dir`'s log, resuming at its `audit.head` when that verifies
    /// under `key` (otherwise the first export checks the whole log).
    pub fn open(store: StoreHandle, key: AuditKey, data_dir: &Path) -> AuditHeads {
        let path = data_dir.join(AUDIT_HEAD_FILE);
        let trusted = match HeadFile::read(&path, &key, true) {
            Ok(head) => Some(head),
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                tracing::error!("{e}; the whole audit log will be checked instead");
                None
            }
        };
        AuditHeads {
            store,
            key,
            path,
            state: tokio::sync::Mutex::new(HeadState {
                trusted,
                reported: None,
            }),
        }
    }

    /// The last head verified and written, if any.
    pub async fn last(&self) -> Option<AuditHead> {
        self.state.lock().await.trusted.clone()
    }

    /// Checks the log from the last head on; when it is intact and grew, writes and logs the
    /// new head. A broken log is logged (once per failure) and leaves the head where it was.
    pub async fn export(&self) -> Result<AuditVerdict, StoreError> {
        let mut state = self.state.lock().await;
        let verdict = self
            .store
            .check_audit(AuditCheck {
                resume: state.trusted.clone(),
                heads: Vec::new(),
            })
            .await?;
        if let Some(head) = verdict.head() {
            state.reported = None;
            if state.trusted.as_ref() != Some(&head) {
                let text = HeadFile::text(&head, &self.key);
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || {
                    data_dir::replace_private(&path, text.as_bytes())
                })
                .await
                .map_err(|e| StoreError::Internal(format!("head writer failed: {e}")))??;
                tracing::info!("audit head {head}");
                state.trusted = Some(head);
            }
        } else if let AuditVerdict::Broken(link) = &verdict {
            if state.reported.as_ref() != Some(link) {
                tracing::error!(
                    "the audit log does not verify: {link}; the exported head stays at {}",
                    state
                        .trusted
                        .as_ref()
                        .map_or_else(|| "none".to_string(), ToString::to_string)
                );
                state.reported = Some(link.clone());
            }
        }
        Ok(verdict)
    }

    /// Exports every `every` (the first at once) until `shutdown`; the final export is the
    /// caller's, after the last writes.
    pub async fn run(
        self: std::sync::Arc<Self>,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.export().await {
                        tracing::error!(error = %e, "could not export the audit head");
                    }
                }
                () = crate::stopped(&mut shutdown) => return,
            }
        }
    }
}

/// Appends an entry without waiting for it to be durable.
pub fn record(store: &StoreHandle, actor: &str, action: &str, target: &str, detail: Json) {
    let store = store.clone();
    let entry = NewAuditEntry {
        ts_ms: crate::persist::now_ms() as i64,
        actor: truncate(actor, 128),
        action: action.to_string(),
        target: truncate(target, 512),
        detail,
    };
    tokio::spawn(async move {
        if let Err(e) = store.append_audit(entry).await {
            tracing::error!(error = %e, "could not append to the audit log");
        }
    });
}

/// At most `max` bytes of `s`, cut at a character boundary, control characters replaced.
fn truncate(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    if out.is_empty() {
        out.push_str("anonymous");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use stratus_store::SqliteOptions;

    fn entry(i: i64) -> NewAuditEntry {
        NewAuditEntry {
            ts_ms: i,
            actor: "admin".into(),
            action: "device.create".into(),
            target: format!("devices/d-{i}"),
            detail: json!({ "i": i }),
        }
    }

    #[test]
    fn the_key_is_created_once_keyed_after_the_unkeyed_entries() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(crate::persist::DATABASE_FILE);
        let store = SqliteStore::open(&db).unwrap();
        for i in 1..=3 {
            store.append_audit(entry(i)).unwrap();
        }
        drop(store);
        let key = open_audit_key(dir.path()).unwrap();
        assert_eq!(key.keyed_from(), 4);
        let path = dir.path().join(AUDIT_KEY_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&path).unwrap().len(), 40);
        let again = open_audit_key(dir.path()).unwrap();
        assert_eq!(again.keyed_from(), 4, "a second start reads the same key");
        let store = SqliteStore::open_with(
            &db,
            &SqliteOptions {
                audit_key: Some(again),
                ..SqliteOptions::default()
            },
        )
        .unwrap();
        store.append_audit(entry(4)).unwrap();
        assert!(matches!(
            store.verify_audit().unwrap(),
            AuditVerdict::Intact { entries: 4, .. }
        ));
        std::fs::write(&path, [1u8; 33]).unwrap();
        assert!(matches!(
            open_audit_key(dir.path()),
            Err(AuditFileError::Invalid { .. })
        ));
        std::fs::write(&path, [1u8; 32]).unwrap();
        assert_eq!(read_audit_key(&path).unwrap().keyed_from(), 1);
    }

    #[test]
    fn head_files_carry_a_mac_that_must_verify() {
        let key = AuditKey::new(&[3; 32], 1).unwrap();
        let head: AuditHead = format!("7:{}", "ab".repeat(32)).parse().unwrap();
        let text = HeadFile::text(&head, &key);
        assert_eq!(
            HeadFile::parse(&text).unwrap(),
            HeadFile {
                head: head.clone(),
                mac: Some(head.mac(&key))
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(HeadFile::read(&path, &key, true).unwrap(), head);
        // An older head put in its place without the key does not verify.
        let older = text.replacen("7:", "6:", 1);
        std::fs::write(&path, older).unwrap();
        assert!(matches!(
            HeadFile::read(&path, &key, false),
            Err(AuditFileError::Forged { .. })
        ));
        // An operator's note: no MAC, accepted only where none is required.
        std::fs::write(&path, format!("{head}\n")).unwrap();
        assert_eq!(HeadFile::read(&path, &key, false).unwrap(), head);
        assert!(HeadFile::read(&path, &key, true).is_err());
        for bad in [
            "",
            "7\n",
            "7:ab\n",
            &format!("{head}\nmac x\n"),
            &format!("{text}more\n"),
        ] {
            assert!(HeadFile::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn heads_are_exported_as_the_log_grows_and_never_past_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let key = open_audit_key(dir.path()).unwrap();
        let db = dir.path().join(crate::persist::DATABASE_FILE);
        let options = SqliteOptions {
            audit_key: Some(key.clone()),
            ..SqliteOptions::default()
        };
        let store = StoreHandle::open_sqlite_with(&db, &options).unwrap();
        let heads = AuditHeads::open(store.clone(), key.clone(), dir.path());
        assert_eq!(
            heads.export().await.unwrap().head(),
            Some(AuditHead::empty())
        );
        for i in 1..=4 {
            store.append_audit(entry(i)).await.unwrap();
        }
        let exported = heads.export().await.unwrap().head().unwrap();
        assert_eq!(exported.seq, 4);
        let path = dir.path().join(AUDIT_HEAD_FILE);
        assert_eq!(HeadFile::read(&path, &key, true).unwrap(), exported);
        // A restart resumes at the file's head.
        let reopened = AuditHeads::open(store.clone(), key.clone(), dir.path());
        assert_eq!(reopened.last().await, Some(exported.clone()));
        // Entries cut behind the server's back: reported, and the head does not move back.
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute("DELETE FROM audit WHERE seq = 4", [])
            .unwrap();
        let verdict = reopened.export().await.unwrap();
        assert_eq!(
            verdict,
            AuditVerdict::Broken(BrokenLink {
                seq: 4,
                reason: stratus_store::BrokenReason::Truncated { last: 3, head: 4 }
            })
        );
        assert_eq!(HeadFile::read(&path, &key, true).unwrap(), exported);
    }
}
