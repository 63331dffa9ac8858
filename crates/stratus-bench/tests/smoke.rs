//! Every scenario at a tiny scale against an in-process Stratus broker: the harness works
//! end to end (handshakes, QoS 1/2 flows, counting, reports) and cannot rot unnoticed.

use std::time::Duration;

use stratus_bench::args::Scenario;
use stratus_bench::scenarios::{run_one, Ctx};
use stratus_server::{Config, Overrides, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_stratus() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        data_dir: Some(dir.path().to_path_buf()),
        mqtt_port: Some(0),
        http_port: Some(0),
        allow_anonymous: true,
        ..Default::default()
    };
    let config = Config::load(None, &overrides).unwrap();
    let server = Server::start(config).await.unwrap();
    let pid = std::process::id();
    let samples = dir.path().join("latency-samples.txt");

    for (i, scenario) in Scenario::ALL.into_iter().enumerate() {
        let ctx = Ctx {
            addr: server.mqtt_addr,
            run: 0x5eed_0000 + i as u32,
            scale: 0.002,
            broker_pid: Some(pid),
            latency_samples: Some(samples.clone()),
        };
        let report = run_one(ctx, scenario, Duration::from_secs(30)).await;
        let line = report.to_json();
        assert!(!report.timed_out, "{line}");
        assert!(report.failure.is_none(), "{line}");
        assert!(report.received > 0, "{line}");
        assert_eq!(report.duplicates, 0, "{line}");
        assert_eq!(report.strays, 0, "{line}");
        if scenario.must_not_lose() {
            assert_eq!(report.lost, 0, "{line}");
        }
        assert!(report.cpu_secs.is_some(), "{line}");
        assert!(report.broker_cpu_secs.is_some(), "{line}");
        let value = |name: &str| {
            report
                .figures
                .iter()
                .find(|f| f.name == name)
                .and_then(|f| f.value)
        };
        match scenario {
            Scenario::Latency => {
                let (p50, p99, max) = (value("p50"), value("p99"), value("max"));
                assert!(p50.unwrap() <= p99.unwrap() && p99 <= max, "{line}");
                let (w50, w99) = (value("machine_hop_p50"), value("machine_hop_p99"));
                assert!(w50.unwrap() <= w99.unwrap(), "{line}");
                // `--latency-samples`: one sample (µs) per message received, none above max.
                let text = std::fs::read_to_string(&samples).unwrap();
                let written: Vec<f64> = text.lines().map(|l| l.parse().unwrap()).collect();
                assert_eq!(written.len() as u64, report.received, "{line}");
                let top = written.iter().cloned().fold(0.0, f64::max);
                assert!((top - max.unwrap()).abs() < 0.1, "{top} against {line}");
            }
            Scenario::Idle => {
                assert!(value("connect_rate").unwrap() > 0.0, "{line}");
                assert!(value("rss_per_conn").is_some(), "{line}");
            }
            Scenario::Retained => assert!(value("all_arrived").is_some(), "{line}"),
            _ => assert!(value("throughput").unwrap() > 0.0, "{line}"),
        }
    }
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_that_cannot_finish_times_out_and_fails() {
    // A listener that accepts and never answers: CONNECT waits for a CONNACK forever.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let ctx = Ctx {
        addr,
        run: 1,
        scale: 0.001,
        broker_pid: None,
        latency_samples: None,
    };
    let report = run_one(ctx, Scenario::FaninQos1, Duration::from_millis(300)).await;
    assert!(report.timed_out);
    assert!(!report.ok);
    assert_eq!(report.lost, report.expected);
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_fails_the_scenario() {
    // Bind then drop: nothing listens on this port any more.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ctx = Ctx {
        addr,
        run: 2,
        scale: 0.001,
        broker_pid: None,
        latency_samples: None,
    };
    let report = run_one(ctx, Scenario::Retained, Duration::from_secs(5)).await;
    assert!(!report.ok);
    assert!(!report.timed_out);
    assert!(report.failure.unwrap().contains("connecting to"));
}
