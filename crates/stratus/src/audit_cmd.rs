//! `stratus audit verify`: recomputes the audit log's SHA-256 hash chain straight from a data
//! dir's store (no server needed, and a server cannot lie about it) and names the first entry
//! that does not verify.
//!
//! Exit codes: 0 intact (`audit log intact: N entries`), 1 broken (`audit log broken at entry
//! SEQ: REASON`) or unreadable, 2 usage (no store in the data dir).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use stratus_store::{AuditVerdict, StoreHandle};

use crate::admin::{self, UsageError};

/// `stratus audit …`.
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check that no audit entry was changed, removed or reordered (exit 1 naming the first
    /// one that was).
    Verify {
        /// The data dir whose store to check [default: ./stratus-data, or
        /// $STRATUS_SERVER__DATA_DIR when set].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Print the verdict as JSON (the shape of `GET /api/v1/audit/verify`).
        #[arg(long)]
        json: bool,
    },
}

/// Runs `stratus audit …`; `Ok(false)` when the log is broken.
pub fn run(args: AuditArgs) -> anyhow::Result<bool> {
    match args.command {
        AuditCommand::Verify { data_dir, json } => {
            let dir = data_dir.unwrap_or_else(admin::default_data_dir);
            let db = dir.join(stratus_server::persist::DATABASE_FILE);
            if !db.is_file() {
                return Err(UsageError(format!(
                    "no Stratus data in {} ({} does not exist); pass --data-dir",
                    dir.display(),
                    db.display()
                ))
                .into());
            }
            let verdict = admin::block_on(async move {
                let store = StoreHandle::open_sqlite(&db)
                    .with_context(|| format!("opening {}", db.display()))?;
                store.verify_audit().await.context("reading the audit log")
            })?;
            if json {
                let view = stratus_server::api::audit::AuditVerification::from(&verdict);
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("{}", describe(&verdict));
            }
            Ok(matches!(verdict, AuditVerdict::Intact { .. }))
        }
    }
}

/// The one-line verdict.
fn describe(verdict: &AuditVerdict) -> String {
    match verdict {
        AuditVerdict::Intact { entries, .. } => format!(
            "audit log intact: {entries} entr{}",
            if *entries == 1 { "y" } else { "ies" }
        ),
        AuditVerdict::Broken(link) => {
            format!("audit log broken at entry {}: {}", link.seq, link.reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_store::{BrokenLink, BrokenReason};

    #[test]
    fn verdicts_read_as_one_line() {
        assert_eq!(
            describe(&AuditVerdict::Intact {
                entries: 3,
                head_hash: None
            }),
            "audit log intact: 3 entries"
        );
        assert_eq!(
            describe(&AuditVerdict::Intact {
                entries: 1,
                head_hash: None
            }),
            "audit log intact: 1 entry"
        );
        assert_eq!(
            describe(&AuditVerdict::Broken(BrokenLink {
                seq: 4,
                reason: BrokenReason::HashMismatch
            })),
            "audit log broken at entry 4: content does not match its hash"
        );
    }
}
