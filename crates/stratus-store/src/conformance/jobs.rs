//! The write-contract checks: jobs are atomic on their own and independent of the jobs they
//! share a commit with, and the group committer in front of the backend.

use std::sync::Arc;

use bytes::Bytes;

use super::new_device;
use crate::mqtt::{MqttOp, StoredRetained};
use crate::telemetry::{Agg, AggregateQuery, Point, PointQuery, Value, MINUTE_MS};
use crate::write::{Output, Write};
use crate::{GroupCommitter, Store, StoreError};

const BASE: i64 = 1_700_000_040_000;

/// Runs every write-contract check, including [`run_group_commit`].
pub fn run_jobs<S: Store>(open: impl Fn() -> S) {
    independent_jobs_share_a_commit(&open);
    a_job_is_all_or_nothing(&open);
    telemetry_jobs_of_one_commit(&open);
    mqtt_batches_are_jobs_too(&open);
    run_group_commit(Arc::new(open()));
}

fn batch(device: &str, from: i64, n: i64) -> Vec<Point> {
    (0..n)
        .map(|i| Point::new(device, "x", BASE + from + i, Value::Number(i as f64)))
        .collect()
}

fn stored(s: &impl Store, device: &str) -> Vec<i64> {
    s.points(&PointQuery::new(device, "x", i64::MIN, i64::MAX).limit(100_000))
        .expect("points")
        .points
        .into_iter()
        .map(|p| p.ts_ms - BASE)
        .collect()
}

fn independent_jobs_share_a_commit<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("job-dev")).expect("create");
    let mut with_ghost = batch("job-dev", 100, 10);
    with_ghost.push(Point::new("job-ghost", "x", BASE, Value::Number(0.0)));
    let results = s
        .commit_jobs(&[
            vec![Write::AppendTelemetry(batch("job-dev", 0, 10))],
            vec![Write::AppendTelemetry(with_ghost)],
            vec![Write::CreateDevice(new_device("job-dev"))],
            vec![
                Write::AppendTelemetry(batch("job-dev", 200, 10)),
                Write::TouchDevice {
                    id: "job-dev".into(),
                    seen_at_ms: 5,
                },
            ],
            vec![],
        ])
        .expect("the commit itself succeeds");
    assert_eq!(results.len(), 5, "one result per job");
    assert!(
        matches!(&results[0], Ok(o) if o[..] == [Output::Count(10)]),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(&results[1], Err(StoreError::NotFound { id, .. }) if id == "job-ghost"),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(&results[2], Err(StoreError::Conflict { .. })),
        "{:?}",
        results[2]
    );
    assert!(
        matches!(&results[3], Ok(o) if o[..] == [Output::Count(10), Output::Done]),
        "{:?}",
        results[3]
    );
    assert!(
        matches!(&results[4], Ok(o) if o.is_empty()),
        "{:?}",
        results[4]
    );
    drop(s);
    let s = open();
    let expected: Vec<i64> = (0..10).chain(200..210).collect();
    assert_eq!(
        stored(&s, "job-dev"),
        expected,
        "the jobs that succeeded are durable, the failed one left nothing"
    );
    assert_eq!(
        s.device("job-dev")
            .expect("get")
            .and_then(|d| d.last_seen_ms),
        Some(5)
    );
    assert!(s.commit_jobs(&[]).expect("no jobs").is_empty());
    s.delete_device("job-dev").expect("delete");
}

fn one(device: &str, minute: i64, x: f64) -> Write {
    Write::AppendTelemetry(vec![Point::new(
        device,
        "x",
        BASE + minute * MINUTE_MS + x as i64,
        Value::Number(x),
    )])
}

fn touch(device: &str, seen_at_ms: i64) -> Write {
    Write::TouchDevice {
        id: device.into(),
        seen_at_ms,
    }
}

fn per_minute(s: &impl Store, device: &str, agg: Agg) -> Vec<(u64, f64)> {
    s.aggregate(&AggregateQuery {
        device_id: device.into(),
        key: "x".into(),
        from_ms: BASE,
        to_ms: BASE + 3 * MINUTE_MS,
        interval_ms: MINUTE_MS,
        agg,
    })
    .expect("aggregate")
    .into_iter()
    .map(|b| (b.count, b.value))
    .collect()
}

/// Many telemetry jobs of one device in one commit (what a busy device's messages become):
/// the rollups count exactly the jobs that succeeded, `last_seen_ms` is the largest touch, and
/// a device deleted in the middle of the commit is unknown to the jobs after it.
fn telemetry_jobs_of_one_commit<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("tx-dev")).expect("create");
    s.create_device(new_device("tx-gone")).expect("create");
    let results = s
        .commit_jobs(&[
            vec![
                one("tx-dev", 0, 1.0),
                one("tx-dev", 0, 2.0),
                touch("tx-dev", 10),
            ],
            vec![one("tx-dev", 0, 3.0), touch("tx-dev", 5)],
            vec![one("tx-dev", 1, 4.0), one("tx-ghost", 0, 1.0)],
            vec![
                one("tx-dev", 1, 8.0),
                Write::PutDesiredConfig {
                    id: "tx-dev".into(),
                    value: serde_json::json!({}),
                    expected_version: Some(9),
                    now_ms: 1,
                },
            ],
            vec![
                one("tx-dev", 1, 9.0),
                Write::AppendTelemetry(vec![Point::new("tx-dev", "", BASE, Value::Bool(true))]),
            ],
            vec![one("tx-dev", 1, 5.0), touch("tx-dev", 20)],
            // Known in this commit, then deleted: later jobs must not take it for existing.
            vec![one("tx-gone", 0, 7.0), touch("tx-gone", 10)],
            vec![Write::DeleteDevice {
                id: "tx-gone".into(),
            }],
            vec![touch("tx-gone", 5)],
            vec![one("tx-gone", 0, 9.0)],
            vec![one("tx-dev", 1, 6.0), touch("tx-dev", 20)],
        ])
        .expect("the commit itself succeeds");
    let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(
        ok,
        [true, true, false, false, false, true, true, true, false, false, true],
        "{results:?}"
    );
    assert!(
        matches!(&results[4], Err(StoreError::Invalid(_))),
        "{:?}",
        results[4]
    );
    for i in [8, 9] {
        assert!(
            matches!(&results[i], Err(StoreError::NotFound { id, .. }) if id == "tx-gone"),
            "job {i} after the delete: {:?}",
            results[i]
        );
    }
    drop(s);
    let s = open();
    // Minute 0: 1, 2, 3; minute 1: 5, 6 (4, 8 and 9 were in failed jobs).
    for (agg, expected) in [
        (Agg::Sum, [(3, 6.0), (2, 11.0)]),
        (Agg::Min, [(3, 1.0), (2, 5.0)]),
        (Agg::Max, [(3, 3.0), (2, 6.0)]),
    ] {
        assert_eq!(
            per_minute(&s, "tx-dev", agg),
            expected,
            "{agg:?}: the minute rollups hold the points of the jobs that succeeded, once"
        );
    }
    assert_eq!(
        s.device("tx-dev")
            .expect("get")
            .and_then(|d| d.last_seen_ms),
        Some(20)
    );
    assert!(s.device("tx-gone").expect("get").is_none());
    s.delete_device("tx-dev").expect("delete");
}

fn a_job_is_all_or_nothing<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("job-atomic")).expect("create");
    let result = s.write_job(vec![
        Write::AppendTelemetry(batch("job-atomic", 0, 50)),
        Write::PutDesiredConfig {
            id: "job-atomic".into(),
            value: serde_json::json!({ "x": 1 }),
            expected_version: Some(7),
            now_ms: 1,
        },
    ]);
    assert!(
        matches!(result, Err(StoreError::VersionMismatch { current: 0 })),
        "{result:?}"
    );
    let result = s.write_job(vec![
        Write::PutDesiredConfig {
            id: "job-atomic".into(),
            value: serde_json::json!({ "x": 1 }),
            expected_version: None,
            now_ms: 1,
        },
        Write::AppendTelemetry(vec![Point::new("job-atomic", "", BASE, Value::Bool(true))]),
    ]);
    assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    drop(s);
    let s = open();
    assert!(
        stored(&s, "job-atomic").is_empty(),
        "the points of a failed job are not stored"
    );
    assert_eq!(
        s.device("job-atomic")
            .expect("get")
            .map(|d| d.desired.version),
        Some(0),
        "the config write of a failed job is not stored"
    );
    s.delete_device("job-atomic").expect("delete");
}

fn retained(topic: &str) -> StoredRetained {
    StoredRetained {
        topic: topic.into(),
        payload: Bytes::from_static(b"on"),
        qos: 1,
        properties: Bytes::new(),
        expires_at_ms: None,
        origin: String::new(),
    }
}

fn mqtt_batches_are_jobs_too<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    let outputs = s
        .write_job(vec![Write::Mqtt(vec![MqttOp::RetainSet(retained(
            "job/t",
        ))])])
        .expect("write");
    assert_eq!(outputs, vec![Output::Done]);
    drop(s);
    let s = open();
    assert_eq!(
        s.load_mqtt().expect("load").retained,
        vec![retained("job/t")]
    );
    s.write_one(Write::Mqtt(vec![MqttOp::RetainDelete {
        topic: "job/t".into(),
    }]))
    .expect("write");
    assert!(s.load_mqtt().expect("load").retained.is_empty());
}

/// Checks the group committer in front of `store`: queued jobs share transactions, each gets
/// its own result, failed jobs do not affect the others, and MQTT batches ride along.
pub fn run_group_commit<S: Store>(store: Arc<S>) {
    let committer = GroupCommitter::start_backend(store.clone(), 10_000).expect("start");
    let outputs = committer
        .submit_writes(vec![Write::CreateDevice(new_device("gc-dev"))])
        .blocking_recv()
        .expect("the writer answers");
    assert!(
        matches!(outputs.as_deref(), Ok([Output::Device(_)])),
        "{outputs:?}"
    );
    let before = committer.stats();
    let completions: Vec<_> = (0..400i64)
        .map(|i| {
            let mut points = batch("gc-dev", i * 100, 20);
            if i % 10 == 3 {
                points.push(Point::new("gc-ghost", "x", BASE, Value::Number(0.0)));
            }
            committer.submit_writes(vec![Write::AppendTelemetry(points)])
        })
        .collect();
    let mqtt = committer.submit(vec![MqttOp::RetainSet(retained("gc/t"))]);
    for (i, completion) in completions.into_iter().enumerate() {
        let result = completion.blocking_recv().expect("the writer answers");
        if i % 10 == 3 {
            assert!(
                matches!(result, Err(StoreError::NotFound { .. })),
                "job {i}: {result:?}"
            );
        } else {
            assert_eq!(result.expect("stored"), vec![Output::Count(20)], "job {i}");
        }
    }
    mqtt.blocking_recv()
        .expect("the writer answers")
        .expect("the MQTT batch is stored");
    let after = committer.stats();
    assert_eq!(after.batches - before.batches, 401);
    assert_eq!(after.failed_jobs - before.failed_jobs, 40);
    assert!(
        after.transactions - before.transactions < 401,
        "queued jobs share transactions ({} for 401 jobs)",
        after.transactions - before.transactions
    );
    committer.close();
    assert_eq!(stored(&*store, "gc-dev").len(), 360 * 20);
    assert_eq!(
        store.load_mqtt().expect("load").retained,
        vec![retained("gc/t")]
    );
    store
        .commit_mqtt(&[MqttOp::RetainDelete {
            topic: "gc/t".into(),
        }])
        .expect("commit");
    store.delete_device("gc-dev").expect("delete");
}
