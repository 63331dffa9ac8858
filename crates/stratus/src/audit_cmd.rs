//! `stratus audit verify` and `stratus audit head`: check the audit log straight from a data
//! dir's store (no server needed, and a server cannot lie about it) with the audit key, which
//! is kept outside the store (`DATA_DIR/audit.key`, or `--key FILE` for a copy kept elsewhere).
//!
//! `verify` recomputes the keyed chain and names the first entry that was changed, removed,
//! reordered or re-chained; it also holds the log to heads (`SEQ:HASH`) kept earlier: the data
//! dir's `audit.head` (written by the server, MACed under the key) and any `--head` or
//! `--head-file` given, so that entries cut from the end are reported too. `head` prints the
//! verified log's head for an operator to keep where the data dir's writers cannot reach.
//!
//! Exit codes: 0 intact (`audit log intact: N entries`, or the head), 1 broken (`audit log
//! broken at entry SEQ: REASON`), a head file that does not verify, or an unreadable store,
//! 2 usage (no store or no key in the data dir, a malformed head).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use stratus_server::api::audit::AuditVerification;
use stratus_server::audit::{
    read_audit_key, AuditFileError, HeadFile, AUDIT_HEAD_FILE, AUDIT_KEY_FILE,
};
use stratus_store::{
    AuditCheck, AuditHead, AuditKey, AuditStore, AuditVerdict, BrokenReason, SqliteOptions,
    SqliteStore,
};

use crate::admin::{self, UsageError};

/// `stratus audit …`.
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check that no audit entry was changed, removed, reordered or re-chained, and that none
    /// was cut from the end (exit 1 naming the first bad entry or the cut).
    Verify {
        #[command(flatten)]
        log: LogArgs,
        /// A head kept earlier (from `stratus audit head` or the server's `audit head` log
        /// line): the log must still reach it, with the same hash. Repeatable.
        #[arg(long, value_name = "SEQ:HASH", value_parser = parse_head)]
        head: Vec<AuditHead>,
        /// A file holding a head: a copy of the server's `audit.head` (its MAC must verify) or
        /// `SEQ:HASH` on one line. Repeatable. DATA_DIR/audit.head is always checked when it
        /// exists.
        #[arg(long, value_name = "FILE")]
        head_file: Vec<PathBuf>,
        /// Print the verdict as JSON (the shape of `GET /api/v1/audit/verify`).
        #[arg(long)]
        json: bool,
    },
    /// Verify the log (against DATA_DIR/audit.head too) and print its head, `SEQ:HASH`, to
    /// keep where whoever can write the data dir cannot reach; `verify --head` checks it later.
    Head {
        #[command(flatten)]
        log: LogArgs,
    },
}

/// Where the log and its key are.
#[derive(clap::Args, Debug)]
struct LogArgs {
    /// The data dir whose store to check [default: ./stratus-data, or
    /// $STRATUS_SERVER__DATA_DIR when set].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The audit key file [default: DATA_DIR/audit.key].
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

fn parse_head(text: &str) -> Result<AuditHead, String> {
    text.parse().map_err(|e| format!("{e}"))
}

/// A head to check and where it came from.
struct Head {
    head: AuditHead,
    from: String,
}

/// Runs `stratus audit …`; `Ok(false)` when the log is broken.
pub fn run(args: AuditArgs) -> anyhow::Result<bool> {
    match args.command {
        AuditCommand::Verify {
            log,
            head,
            head_file,
            json,
        } => {
            let (dir, key) = locate(&log)?;
            let mut heads: Vec<Head> = head
                .into_iter()
                .map(|head| Head {
                    head,
                    from: "--head".into(),
                })
                .collect();
            for path in &head_file {
                match HeadFile::read(path, &key, false) {
                    Ok(head) => heads.push(Head {
                        head,
                        from: path.display().to_string(),
                    }),
                    Err(e @ AuditFileError::Forged { .. }) => return not_verified(&e, json),
                    Err(e) => return Err(UsageError(e.to_string()).into()),
                }
            }
            match own_head(&dir, &key) {
                Ok(Some(head)) => heads.push(head),
                Ok(None) => {}
                Err(e) => return not_verified(&e, json),
            }
            let verdict = check(&dir, key, &heads)?;
            if json {
                let mut view = AuditVerification::from(&verdict);
                if let AuditVerdict::Broken(link) = &verdict {
                    view.reason = Some(reason(&link.reason, link.seq, &heads));
                }
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("{}", describe(&verdict, &heads));
            }
            Ok(matches!(verdict, AuditVerdict::Intact { .. }))
        }
        AuditCommand::Head { log } => {
            let (dir, key) = locate(&log)?;
            let heads = match own_head(&dir, &key) {
                Ok(head) => head.into_iter().collect::<Vec<_>>(),
                Err(e) => return not_verified(&e, false),
            };
            let verdict = check(&dir, key, &heads)?;
            match verdict.head() {
                Some(head) => println!("{head}"),
                None => println!("{}", describe(&verdict, &heads)),
            }
            Ok(matches!(verdict, AuditVerdict::Intact { .. }))
        }
    }
}

/// The data dir and the audit key (usage errors when either is missing).
fn locate(log: &LogArgs) -> anyhow::Result<(PathBuf, AuditKey)> {
    let dir = log.data_dir.clone().unwrap_or_else(admin::default_data_dir);
    let db = dir.join(stratus_server::persist::DATABASE_FILE);
    if !db.is_file() {
        return Err(UsageError(format!(
            "no Stratus data in {} ({} does not exist); pass --data-dir",
            dir.display(),
            db.display()
        ))
        .into());
    }
    let key_path = log.key.clone().unwrap_or_else(|| dir.join(AUDIT_KEY_FILE));
    let key = match read_audit_key(&key_path) {
        Ok(key) => key,
        Err(e) if e.is_not_found() => {
            return Err(UsageError(format!(
                "no audit key: {} does not exist (the server creates DATA_DIR/{AUDIT_KEY_FILE} \
                 at its first start); pass --key FILE",
                key_path.display()
            ))
            .into())
        }
        Err(e @ AuditFileError::Invalid { .. }) => return Err(UsageError(e.to_string()).into()),
        Err(e) => return Err(e).context("reading the audit key"),
    };
    Ok((dir, key))
}

/// The data dir's own `audit.head`, which must verify under the key when it exists.
fn own_head(dir: &Path, key: &AuditKey) -> Result<Option<Head>, AuditFileError> {
    let path = dir.join(AUDIT_HEAD_FILE);
    match HeadFile::read(&path, key, true) {
        Ok(head) => Ok(Some(Head {
            head,
            from: path.display().to_string(),
        })),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Verifies the log of `dir` with `key` against `heads`.
fn check(dir: &Path, key: AuditKey, heads: &[Head]) -> anyhow::Result<AuditVerdict> {
    let db = dir.join(stratus_server::persist::DATABASE_FILE);
    let store = SqliteStore::open_with(
        &db,
        &SqliteOptions {
            readers: 1,
            audit_key: Some(key),
            ..SqliteOptions::default()
        },
    )
    .with_context(|| format!("opening {}", db.display()))?;
    store
        .check_audit(&AuditCheck {
            resume: None,
            heads: heads.iter().map(|h| h.head.clone()).collect(),
        })
        .context("reading the audit log")
}

/// A head file that does not verify: reported like a broken log (exit 1).
fn not_verified(e: &AuditFileError, json: bool) -> anyhow::Result<bool> {
    if json {
        let view = serde_json::json!({ "intact": false, "reason": e.to_string() });
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        println!("audit log not verified: {e}");
    }
    Ok(false)
}

/// Why the entry at `seq` is broken, naming the head a head-related reason comes from.
fn reason(reason: &BrokenReason, seq: u64, heads: &[Head]) -> String {
    let from = match reason {
        BrokenReason::Truncated { head, .. } => heads.iter().find(|h| h.head.seq == *head),
        BrokenReason::HeadMismatch => heads.iter().find(|h| h.head.seq == seq),
        _ => None,
    };
    match from {
        Some(h) => format!("{reason} (head from {})", h.from),
        None => reason.to_string(),
    }
}

/// The one-line verdict.
fn describe(verdict: &AuditVerdict, heads: &[Head]) -> String {
    match verdict {
        AuditVerdict::Intact { entries, .. } => format!(
            "audit log intact: {entries} entr{}",
            if *entries == 1 { "y" } else { "ies" }
        ),
        AuditVerdict::Broken(link) => format!(
            "audit log broken at entry {}: {}",
            link.seq,
            reason(&link.reason, link.seq, heads)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_store::BrokenLink;

    #[test]
    fn verdicts_read_as_one_line() {
        assert_eq!(
            describe(
                &AuditVerdict::Intact {
                    entries: 3,
                    head_hash: None
                },
                &[]
            ),
            "audit log intact: 3 entries"
        );
        assert_eq!(
            describe(
                &AuditVerdict::Intact {
                    entries: 1,
                    head_hash: None
                },
                &[]
            ),
            "audit log intact: 1 entry"
        );
        assert_eq!(
            describe(
                &AuditVerdict::Broken(BrokenLink {
                    seq: 4,
                    reason: BrokenReason::HashMismatch
                }),
                &[]
            ),
            "audit log broken at entry 4: content does not match its hash"
        );
        let heads = [Head {
            head: AuditHead {
                seq: 8,
                hash: "ab".repeat(32),
            },
            from: "data/audit.head".into(),
        }];
        assert_eq!(
            describe(
                &AuditVerdict::Broken(BrokenLink {
                    seq: 6,
                    reason: BrokenReason::Truncated { last: 5, head: 8 }
                }),
                &heads
            ),
            "audit log broken at entry 6: the log ends at seq 5 but the head says 8: entries \
             were cut (head from data/audit.head)"
        );
    }
}
