//! The SQLite backend against the shared conformance suite, plus what is specific to it:
//! group commit, the async handle, schema upgrades, reads beside an open write, and
//! durability across a crash of the writing process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::json;
use stratus_store::conformance::{self, AggregationCase};
use stratus_store::*;

fn temp_db(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    (dir, path)
}

#[test]
fn sqlite_passes_the_mqtt_conformance_suite() {
    let (_dir, path) = temp_db("stratus.db");
    conformance::run_mqtt(|| SqliteStore::open(&path).unwrap());
}

#[test]
fn sqlite_passes_the_device_conformance_suite() {
    let (_dir, path) = temp_db("stratus.db");
    conformance::run_devices(|| SqliteStore::open(&path).unwrap());
}

#[test]
fn sqlite_passes_the_client_conformance_suite() {
    let (_dir, path) = temp_db("stratus.db");
    conformance::run_clients(|| SqliteStore::open(&path).unwrap());
}

#[test]
fn sqlite_passes_the_telemetry_conformance_suite() {
    let (_dir, path) = temp_db("stratus.db");
    conformance::run_telemetry(|| SqliteStore::open(&path).unwrap());
}

#[test]
fn sqlite_passes_the_series_quota_conformance_check() {
    let (_dir, path) = temp_db("stratus.db");
    let options = SqliteOptions {
        max_series_per_device: 3,
        ..SqliteOptions::default()
    };
    conformance::run_series_quota(|| SqliteStore::open_with(&path, &options).unwrap());
}

#[test]
fn sqlite_passes_the_rule_and_alarm_conformance_suite() {
    let (_dir, path) = temp_db("stratus.db");
    conformance::run_rules(|| SqliteStore::open(&path).unwrap());
}

#[test]
fn sqlite_passes_the_write_contract_conformance_suite() {
    let (_dir, path) = temp_db("stratus.db");
    conformance::run_jobs(|| SqliteStore::open(&path).unwrap());
}

#[test]
fn sqlite_passes_the_firmware_conformance_suite() {
    let (_dir, path) = temp_db("stratus.db");
    conformance::run_firmware(|| SqliteStore::open(&path).unwrap());
}

fn keyed(path: &Path) -> SqliteStore {
    keyed_with(path, Some(conformance::audit_key()))
}

fn keyed_with(path: &Path, audit_key: Option<AuditKey>) -> SqliteStore {
    SqliteStore::open_with(
        path,
        &SqliteOptions {
            audit_key,
            ..SqliteOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn sqlite_passes_the_audit_conformance_suite() {
    let (_dir, path) = temp_db("stratus.db");
    conformance::run_audit(|| keyed(&path));
}

#[test]
fn sqlite_passes_the_whole_suite_on_one_database() {
    let (_dir, path) = temp_db("stratus.db");
    conformance::run_all(|| keyed(&path));
}

#[test]
fn audit_tampering_through_sql_is_detected() {
    let (_dir, path) = temp_db("audit.db");
    conformance::run_audit_tamper(
        || keyed(&path),
        |rows| {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute("DELETE FROM audit", []).unwrap();
            for r in rows {
                tx.execute(
                    "INSERT INTO audit (seq, ts_ms, actor, action, target, detail, prev_hash, \
                     hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    rusqlite::params![
                        r.seq,
                        r.ts_ms,
                        r.actor,
                        r.action,
                        r.target,
                        r.detail,
                        r.prev_hash,
                        r.hash
                    ],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        },
    );
}

#[test]
fn failure_entries_are_pruned_and_tampering_through_sql_is_detected() {
    let (_dir, path) = temp_db("audit.db");
    conformance::run_audit_failures(
        || keyed(&path),
        |rows| {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute("DELETE FROM audit_failures", []).unwrap();
            for r in rows {
                tx.execute(
                    "INSERT INTO audit_failures (id, batch, ts_ms, actor, action, target, \
                     detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    rusqlite::params![
                        r.id, r.batch, r.ts_ms, r.actor, r.action, r.target, r.detail
                    ],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        },
    );
}

#[test]
fn sqlite_keeps_unkeyed_audit_logs_verifiable_once_keyed() {
    let (_dir, path) = temp_db("audit.db");
    conformance::run_audit_upgrade(|key| keyed_with(&path, key));
}

#[test]
fn a_value_of_the_wrong_type_is_a_broken_link() {
    let (_dir, path) = temp_db("audit.db");
    let store = keyed(&path);
    for i in 1..=4 {
        store
            .append_audit(NewAuditEntry {
                ts_ms: i,
                actor: "admin".into(),
                action: "config.put".into(),
                target: "dev-1".into(),
                detail: json!({ "version": i }),
            })
            .unwrap();
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE audit SET detail = x'ff' WHERE seq = 4", [])
        .unwrap();
    assert_eq!(
        store.verify_audit().unwrap(),
        AuditVerdict::Broken(BrokenLink {
            seq: 4,
            reason: BrokenReason::Unreadable
        }),
        "a value of the wrong type is a broken link, not a failed verification"
    );
    let fifth = store
        .append_audit(NewAuditEntry {
            ts_ms: 5,
            actor: "admin".into(),
            action: "config.put".into(),
            target: "dev-1".into(),
            detail: json!(null),
        })
        .expect("a damaged newest entry does not stop keyed appends");
    assert_eq!(fifth.seq, 5);
}

#[test]
fn a_new_database_and_its_wal_are_private_to_the_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("nested").join("stratus.db");
    let store = SqliteStore::open(&path).unwrap();
    store
        .append_audit(NewAuditEntry {
            ts_ms: 1,
            actor: "admin".into(),
            action: "config.put".into(),
            target: String::new(),
            detail: json!(null),
        })
        .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    for suffix in ["-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(&dir.path().join("data")), 0o700);
}

#[test]
fn aggregation_matches_a_naive_computation_for_generated_cases() {
    use proptest::test_runner::{Config, TestRunner};
    let (_dir, path) = temp_db("agg.db");
    let store = SqliteStore::open(&path).unwrap();
    let value = prop_oneof![
        8 => (-1_000_000i64..1_000_000).prop_map(|x| Value::Number(x as f64 / 16.0)),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Text("t".into())),
    ];
    let origin = 1_700_000_000_000i64 - 7_200_000;
    let strategy = (
        prop::collection::vec((0i64..4 * 3_600_000, value), 0..200),
        -60_000i64..4 * 3_600_000,
        1i64..4 * 3_600_000,
        prop_oneof![
            Just(60_000i64),
            Just(120_000),
            Just(300_000),
            Just(3_600_000),
            Just(90_000),
            Just(1_000),
            1i64..10_000_000,
        ],
    )
        .prop_map(move |(points, from, len, interval_ms)| AggregationCase {
            points: points.into_iter().map(|(ts, v)| (origin + ts, v)).collect(),
            from_ms: origin + from,
            to_ms: origin + from + len,
            interval_ms,
        });
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let case_no = std::cell::Cell::new(0u32);
    runner
        .run(&strategy, |case| {
            case_no.set(case_no.get() + 1);
            conformance::check_aggregation(&store, &format!("prop-{}", case_no.get()), &case);
            Ok(())
        })
        .unwrap();
}

fn retained(i: usize) -> MqttOp {
    MqttOp::RetainSet(StoredRetained {
        topic: format!("t/{i}"),
        payload: Bytes::from(format!("p{i}")),
        qos: 1,
        properties: Bytes::new(),
        expires_at_ms: None,
        origin: String::new(),
    })
}

#[tokio::test]
async fn group_commit_shares_transactions_between_concurrent_submitters() {
    let (_dir, path) = temp_db("stratus.db");
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
    let w = committer.submit_writes(vec![Write::PurgeTelemetry { now_ms: 0 }]);
    assert!(
        matches!(w.await.unwrap(), Err(StoreError::Unsupported(_))),
        "an MQTT-only committer refuses other writes"
    );
}

#[test]
fn close_writes_everything_queued() {
    let (_dir, path) = temp_db("s.db");
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

#[test]
fn a_panicking_backend_fails_the_group_and_the_writer_goes_on() {
    struct Flaky(std::sync::atomic::AtomicBool);
    impl WriteBackend for Flaky {
        fn commit_jobs(&self, jobs: &[Vec<Write>]) -> write::JobResults {
            if !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
                panic!("first commit explodes");
            }
            Ok(jobs.iter().map(|_| Ok(Vec::new())).collect())
        }
    }
    let committer = GroupCommitter::start_backend(Arc::new(Flaky(false.into())), 100).unwrap();
    let first = committer.submit_writes(vec![]).blocking_recv().unwrap();
    assert!(
        matches!(&first, Err(StoreError::CommitFailed(e)) if matches!(**e, StoreError::Internal(_))),
        "{first:?}"
    );
    let second = committer.submit_writes(vec![]).blocking_recv().unwrap();
    assert!(second.is_ok(), "{second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_handle_writes_through_the_committer_and_reads_beside_it() {
    let (_dir, path) = temp_db("handle.db");
    let handle = StoreHandle::open_sqlite(&path).unwrap();
    let device = handle
        .create_device(NewDevice {
            id: "h-1".into(),
            secret_hash: "$argon2id$x".into(),
            attributes: json!({ "room": "lab" }),
            created_at_ms: 1,
        })
        .await
        .unwrap();
    assert!(matches!(
        handle.create_device(device_new("h-1")).await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(handle.device("h-1").await.unwrap(), Some(device));
    let v1 = handle
        .put_desired_config("h-1", json!({ "rate": 5 }), Some(0), 2)
        .await
        .unwrap();
    assert_eq!(v1.version, 1);
    assert!(matches!(
        handle
            .put_desired_config("h-1", json!({}), Some(0), 3)
            .await,
        Err(StoreError::VersionMismatch { current: 1 })
    ));
    // Concurrent telemetry writers share commits.
    let before = handle.committer().stats();
    let writers: Vec<_> = (0..8i64)
        .map(|w| {
            let handle = handle.clone();
            tokio::spawn(async move {
                for b in 0..25i64 {
                    let points = (0..100i64)
                        .map(|i| {
                            let ts = 1_700_000_000_000 + (w * 25 + b) * 1000 + i;
                            Point::new("h-1", "temp", ts, Value::Number(i as f64))
                        })
                        .collect();
                    assert_eq!(handle.append_telemetry(points).await.unwrap(), 100);
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let after = handle.committer().stats();
    assert_eq!(after.batches - before.batches, 200);
    let buckets = handle
        .aggregate(AggregateQuery {
            device_id: "h-1".into(),
            key: "temp".into(),
            from_ms: 0,
            to_ms: i64::MAX,
            interval_ms: 60_000,
            agg: Agg::Count,
        })
        .await
        .unwrap();
    assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 20_000);
    let page = handle
        .points(
            PointQuery::new("h-1", "temp", 0, i64::MAX)
                .descending()
                .limit(3),
        )
        .await
        .unwrap();
    assert_eq!(page.points.len(), 3);
    assert_eq!(handle.keys("h-1").await.unwrap(), ["temp"]);
    assert_eq!(handle.latest("h-1").await.unwrap().len(), 1);
    // A job: telemetry together with last-seen and an audit entry, atomically.
    let outputs = handle
        .write(vec![
            Write::AppendTelemetry(vec![Point::new("h-1", "on", 5, Value::Bool(true))]),
            Write::TouchDevice {
                id: "h-1".into(),
                seen_at_ms: 99,
            },
            Write::AppendAudit(NewAuditEntry {
                ts_ms: 99,
                actor: "h-1".into(),
                action: "telemetry.append".into(),
                target: "h-1".into(),
                detail: json!({ "points": 1 }),
            }),
        ])
        .await
        .unwrap();
    assert_eq!(outputs.len(), 3);
    assert!(matches!(&outputs[2], Output::Audit(e) if e.seq == 1));
    assert_eq!(
        handle.device("h-1").await.unwrap().unwrap().last_seen_ms,
        Some(99)
    );
    assert!(matches!(
        handle.verify_audit().await.unwrap(),
        AuditVerdict::Intact { entries: 1, .. }
    ));
    handle.revoke_token("j", 10).await.unwrap();
    assert!(handle.is_token_revoked("j").await.unwrap());
    handle.delete_device("h-1").await.unwrap();
    assert_eq!(handle.device_count().await.unwrap(), 0);
}

fn device_new(id: &str) -> NewDevice {
    NewDevice {
        id: id.into(),
        secret_hash: "$argon2id$y".into(),
        attributes: json!({}),
        created_at_ms: 1,
    }
}

#[test]
fn reads_do_not_wait_for_an_open_write_transaction() {
    let (_dir, path) = temp_db("wal.db");
    let options = SqliteOptions {
        busy_timeout: Duration::ZERO, // a read that needed the write lock would fail at once
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(&path, &options).unwrap();
    store.create_device(device_new("r-1")).unwrap();
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch(
            "BEGIN IMMEDIATE;
             INSERT INTO devices (id, secret_hash, attributes, created_at_ms, desired_version,
                                  desired, desired_updated_ms)
             VALUES ('r-2', 'h', '{}', 1, 0, '{}', 1);",
        )
        .unwrap();
    assert_eq!(
        store.device_count().unwrap(),
        1,
        "readers see the last commit while a write is open"
    );
    assert!(store.device("r-1").unwrap().is_some());
    other.execute_batch("COMMIT").unwrap();
    assert_eq!(store.device_count().unwrap(), 2);
}

#[test]
fn a_version_1_database_is_upgraded_in_place() {
    let (_dir, path) = temp_db("v1.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE mqtt_retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL,
                 qos INTEGER NOT NULL, properties BLOB NOT NULL, expires_at_ms INTEGER) WITHOUT ROWID;
             INSERT INTO mqtt_retained VALUES ('old/topic', x'6869', 1, x'', NULL);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.load_mqtt().unwrap().retained[0].topic, "old/topic");
    store.create_device(device_new("v-1")).unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    assert!(matches!(
        SqliteStore::open(&path),
        Err(StoreError::Corrupt(_))
    ));
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
    let (_dir, path) = temp_db("crash.db");
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

const CRASH_POINTS: i64 = 1000;
const CRASH_THREADS: i64 = 4;

/// The child half of the telemetry crash test: four threads append batches of 1,000 points
/// through the group committer forever, printing each acknowledged batch number.
#[test]
fn telemetry_crash_child() {
    let Ok(path) = std::env::var("STRATUS_STORE_TELEMETRY_CRASH_CHILD") else {
        return; // only runs when the crash test starts this binary as its child
    };
    let store = Arc::new(SqliteStore::open(Path::new(&path)).unwrap());
    store.create_device(device_new("crash")).unwrap();
    let committer = Arc::new(GroupCommitter::start_backend(store, 10_000).unwrap());
    let threads: Vec<_> = (0..CRASH_THREADS)
        .map(|t| {
            let committer = committer.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    let batch = i * CRASH_THREADS + t;
                    let points = (0..CRASH_POINTS)
                        .map(|j| {
                            Point::new(
                                "crash",
                                "v",
                                batch * CRASH_POINTS + j,
                                Value::Number(j as f64),
                            )
                        })
                        .collect();
                    let done = committer
                        .submit_writes(vec![Write::AppendTelemetry(points)])
                        .blocking_recv()
                        .unwrap();
                    assert_eq!(done.unwrap(), vec![Output::Count(CRASH_POINTS as u64)]);
                    println!("acked {batch}");
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn acknowledged_telemetry_batches_survive_kill_9_whole() {
    use std::collections::BTreeSet;
    use std::io::{BufRead, BufReader};
    let (_dir, path) = temp_db("telemetry-crash.db");
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            "telemetry_crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STRATUS_STORE_TELEMETRY_CRASH_CHILD", &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = BTreeSet::new();
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("acked ") {
            acked.insert(n.parse::<i64>().unwrap());
            if acked.len() >= 200 {
                break;
            }
        }
    }
    // SIGKILL while the other threads' batches are queued or mid-transaction.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(acked.len() >= 200, "the child acknowledged batches");
    let store = SqliteStore::open(&path).unwrap();
    // Points per batch: batch b holds times b*1000 .. b*1000+999, so 1-second buckets count them.
    let counts: std::collections::BTreeMap<i64, u64> = store
        .aggregate(&AggregateQuery {
            device_id: "crash".into(),
            key: "v".into(),
            from_ms: 0,
            to_ms: i64::MAX,
            interval_ms: CRASH_POINTS,
            agg: Agg::Count,
        })
        .unwrap()
        .into_iter()
        .map(|b| (b.start_ms / CRASH_POINTS, b.count))
        .collect();
    for (batch, count) in &counts {
        assert_eq!(
            *count, CRASH_POINTS as u64,
            "batch {batch} is whole or absent, never partial"
        );
    }
    for batch in &acked {
        assert!(
            counts.contains_key(batch),
            "acknowledged batch {batch} survived ({} batches stored)",
            counts.len()
        );
    }
    // The rollups agree with the points after the crash.
    let per_minute: u64 = store
        .aggregate(&AggregateQuery {
            device_id: "crash".into(),
            key: "v".into(),
            from_ms: 0,
            to_ms: i64::MAX,
            interval_ms: 60_000,
            agg: Agg::Count,
        })
        .unwrap()
        .iter()
        .map(|b| b.count)
        .sum();
    assert_eq!(per_minute, counts.len() as u64 * CRASH_POINTS as u64);
}

/// Sealed CoAPS keys: set, replaced, cleared, gone with the device, kept across a reopen
/// (the column is added to a database that lacks it, once).
#[test]
fn coap_keys_are_kept_per_device() {
    let (_dir, path) = temp_db("psk.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.create_device(device_new("a")).unwrap();
        s.create_device(device_new("b")).unwrap();
        assert!(s.coap_psks().unwrap().is_empty());
        let set = |id: &str, sealed: Option<Vec<u8>>| {
            s.write_one(Write::SetCoapPsk {
                id: id.into(),
                sealed,
            })
        };
        set("a", Some(vec![1, 2, 3])).unwrap();
        set("b", Some(vec![9])).unwrap();
        set("b", Some(vec![7, 7])).unwrap();
        assert_eq!(
            s.coap_psks().unwrap(),
            vec![
                ("a".to_string(), vec![1, 2, 3]),
                ("b".to_string(), vec![7, 7])
            ]
        );
        assert!(matches!(
            set("nobody", Some(vec![1])),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            set("a", Some(vec![])),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            set("a", Some(vec![0; 2000])),
            Err(StoreError::Invalid(_))
        ));
        set("b", None).unwrap();
        assert_eq!(s.coap_psks().unwrap().len(), 1);
    }
    // Reopened (the column exists now): still there; deleting the device removes its key.
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(
        s.coap_psks().unwrap(),
        vec![("a".to_string(), vec![1, 2, 3])]
    );
    s.delete_device("a").unwrap();
    assert!(s.coap_psks().unwrap().is_empty());
    assert_eq!(s.device("b").unwrap().unwrap().id, "b");
}

/// A database whose `devices` table predates `require_freshness` gets the column once, off
/// for the devices already there, and keeps what is set across a reopen.
#[test]
fn the_require_freshness_column_is_added_to_an_older_database() {
    let (_dir, path) = temp_db("fresh.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE devices (id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL,
                 attributes TEXT NOT NULL, created_at_ms INTEGER NOT NULL,
                 desired_version INTEGER NOT NULL, desired TEXT NOT NULL,
                 desired_updated_ms INTEGER NOT NULL, reported TEXT, reported_updated_ms INTEGER,
                 firmware TEXT, last_seen_ms INTEGER) WITHOUT ROWID;
             INSERT INTO devices (id, secret_hash, attributes, created_at_ms, desired_version,
                                  desired, desired_updated_ms)
             VALUES ('old', 'h', '{}', 1, 0, '{}', 1);
             PRAGMA user_version = 3;",
        )
        .unwrap();
    }
    {
        let s = SqliteStore::open(&path).unwrap();
        assert!(!s.device("old").unwrap().unwrap().require_freshness);
        assert!(
            s.set_require_freshness("old", true)
                .unwrap()
                .require_freshness
        );
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.devices_requiring_freshness().unwrap(), vec!["old"]);
}
