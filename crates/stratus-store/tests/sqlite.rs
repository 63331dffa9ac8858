//! The SQLite backend against the shared conformance suite, plus what is specific to it:
//! group commit, and durability across a crash of the writing process.

use std::sync::Arc;

use bytes::Bytes;
use stratus_store::*;

#[test]
fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stratus.db");
    conformance::run_mqtt(|| SqliteStore::open(&path).unwrap());
}

fn retained(i: usize) -> MqttOp {
    MqttOp::RetainSet(StoredRetained {
        topic: format!("t/{i}"),
        payload: Bytes::from(format!("p{i}")),
        qos: 1,
        properties: Bytes::new(),
        expires_at_ms: None,
    })
}

#[tokio::test]
async fn group_commit_shares_transactions_between_concurrent_submitters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stratus.db");
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let committer = GroupCommitter::start(store.clone(), 10_000).unwrap();
    let completions: Vec<Completion> = (0..2000)
        .map(|i| committer.submit(vec![retained(i)]))
        .collect();
    for c in completions {
        c.await.unwrap().unwrap();
    }
    let stats = committer.stats();
    assert_eq!(stats.batches, 2000);
    assert_eq!(stats.ops, 2000);
    assert!(
        stats.transactions < 2000,
        "concurrent submissions share transactions ({} for 2000 batches)",
        stats.transactions
    );
    committer.close();
    assert_eq!(
        SqliteStore::open(&path)
            .unwrap()
            .load_mqtt()
            .unwrap()
            .retained
            .len(),
        2000
    );
}

#[tokio::test]
async fn a_failed_commit_fails_every_waiter_and_writes_nothing() {
    struct Failing;
    impl MqttStore for Failing {
        fn load_mqtt(&self) -> Result<MqttSnapshot, StoreError> {
            Ok(MqttSnapshot::default())
        }
        fn commit_mqtt(&self, _: &[MqttOp]) -> Result<(), StoreError> {
            Err(StoreError::Corrupt("disk on fire".into()))
        }
    }
    let committer = GroupCommitter::start(Arc::new(Failing), 100).unwrap();
    let c = committer.submit(vec![retained(1)]);
    assert!(
        c.await.unwrap().is_err(),
        "a failed commit is reported, never acknowledged"
    );
}

#[test]
fn close_writes_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let committer = GroupCommitter::start(store, 100).unwrap();
    for i in 0..500 {
        committer.submit_detached(vec![retained(i)]);
    }
    committer.close();
    assert_eq!(
        SqliteStore::open(&path)
            .unwrap()
            .load_mqtt()
            .unwrap()
            .retained
            .len(),
        500
    );
}

/// The child half of the crash test: commits batches forever, printing each acknowledged one.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var("STRATUS_STORE_CRASH_CHILD") else {
        return; // only runs when the crash test starts this binary as its child
    };
    let store = SqliteStore::open(std::path::Path::new(&path)).unwrap();
    for i in 0.. {
        store.commit_mqtt(&[retained(i)]).unwrap();
        println!("acked {i}");
    }
}

#[test]
fn acknowledged_commits_survive_kill_9_of_the_writer() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("STRATUS_STORE_CRASH_CHILD", &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("acked ") {
            last = n.parse::<usize>().ok();
            if last >= Some(300) {
                break;
            }
        }
    }
    // SIGKILL: no destructors, no flush, mid-transaction.
    child.kill().unwrap();
    child.wait().unwrap();
    let last = last.expect("the child acknowledged commits");
    let snap = SqliteStore::open(&path).unwrap().load_mqtt().unwrap();
    let mut found: Vec<usize> = snap
        .retained
        .iter()
        .map(|r| r.topic.trim_start_matches("t/").parse().unwrap())
        .collect();
    found.sort();
    assert!(
        found.len() > last,
        "every acknowledged commit (0..={last}) survived; found {}",
        found.len()
    );
    assert_eq!(
        &found[..=last],
        &(0..=last).collect::<Vec<_>>()[..],
        "no gaps in what was acknowledged"
    );
}
