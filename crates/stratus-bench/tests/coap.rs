//! `stratus bench coap --scale 0.01` against an in-process Stratus server: the command line
//! parses, the setup registers a device and gets its token, the clients' confirmable POSTs
//! are all acknowledged (and stored), the report carries throughput and latency; a server
//! that does not answer makes the run fail with timeouts.

use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use hyper::Method;
use stratus_bench::args::BenchCommand;
use stratus_bench::http::client::{self, Client, Proto};
use stratus_server::{Config, Overrides, Server};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    Bench(stratus_bench::BenchArgs),
}

fn coap_args(argv: &[&str]) -> stratus_bench::CoapArgs {
    let cli = Cli::try_parse_from(argv).unwrap();
    let Command::Bench(bench) = cli.command;
    match bench.command {
        BenchCommand::Coap(args) => args,
        other => panic!("not bench coap: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_coap_runs_against_stratus_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        data_dir: Some(dir.path().to_path_buf()),
        mqtt_port: Some(0),
        http_port: Some(0),
        coap_port: Some(0),
        ..Default::default()
    };
    let config = Config::load(None, &overrides).unwrap();
    let server = Server::start(config).await.unwrap();
    let secret = server
        .admin_secret
        .clone()
        .or_else(|| std::env::var("STRATUS_ADMIN_SECRET").ok())
        .expect("an admin secret");
    let http = format!("http://{}", server.http_addr);
    let coap = format!("coap://{}", server.coap_addr);
    let pid = std::process::id().to_string();
    let args = coap_args(&[
        "stratus",
        "bench",
        "coap",
        "--server",
        &http,
        "--coap",
        &coap,
        &format!("--admin-secret={secret}"),
        "--scale",
        "0.01",
        "--format",
        "json",
        "--timeout",
        "60",
        "--server-pid",
        &pid,
    ]);
    let plan = args.plan().unwrap();
    assert_eq!(plan.coap_addr, server.coap_addr);

    let report = stratus_bench::coap::run_plan(&plan).await.unwrap();
    let line = report.to_json();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["ok"], true, "{line}");
    assert_eq!(v["scenario"], "coap-telemetry", "{line}");
    assert_eq!(v["errors"], 0, "{line}");
    assert_eq!(v["connections"], 64, "{line}");
    let acked = v["acknowledged"].as_u64().unwrap();
    assert!(acked >= 64, "{line}");
    assert_eq!(v["acknowledged"], v["sent"], "{line}");
    let figure = |name: &str| {
        v["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .and_then(|f| f["value"].as_f64())
    };
    assert!(figure("throughput").unwrap() > 0.0, "{line}");
    let (p50, p99, max) = (
        figure("p50").unwrap(),
        figure("p99").unwrap(),
        figure("max").unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{line}");
    assert_eq!(figure("timeouts"), Some(0.0), "{line}");
    assert!(v["server_cpu_secs"].is_number(), "{line}");

    // Every acknowledged record is stored: one point each in the device's series.
    let host = server.http_addr.to_string();
    let mut c = Client::connect(server.http_addr).await.unwrap();
    let admin = client::access_token(&mut c, &host, "admin", &secret)
        .await
        .unwrap();
    let get = |path: String| Proto::new(Method::GET, &path, &host, Some(&admin), false).unwrap();
    let list = c
        .send(&get("/api/v1/devices".into()), Bytes::new())
        .await
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.body).unwrap();
    let ids: Vec<String> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["id"].as_str())
        .filter(|id| id.contains("-coap-"))
        .map(String::from)
        .collect();
    assert_eq!(ids.len(), 64, "one bench device per client: {ids:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut stored = 0u64;
    for id in &ids {
        let path = format!(
            "/api/v1/devices/{id}/telemetry?key={}&agg=count&interval=1h&from={}&to={now}",
            stratus_bench::coap::KEY,
            now - 3 * 86_400_000
        );
        let answer = c.send(&get(path), Bytes::new()).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        stored += v["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>();
    }
    let v = &stored;
    assert_eq!(stored, acked, "{v}");
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_fails_with_timeouts() {
    // The HTTP side is a real server; the CoAP "server" is a socket that reads and drops.
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        data_dir: Some(dir.path().to_path_buf()),
        mqtt_port: Some(0),
        http_port: Some(0),
        coap_port: Some(0),
        ..Default::default()
    };
    let config = Config::load(None, &overrides).unwrap();
    let server = Server::start(config).await.unwrap();
    let secret = server
        .admin_secret
        .clone()
        .or_else(|| std::env::var("STRATUS_ADMIN_SECRET").ok())
        .expect("an admin secret");
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while sink.recv_from(&mut buf).await.is_ok() {}
    });
    let http = format!("http://{}", server.http_addr);
    let coap = format!("coap://{sink_addr}");
    let args = coap_args(&[
        "stratus",
        "bench",
        "coap",
        "--server",
        &http,
        "--coap",
        &coap,
        &format!("--admin-secret={secret}"),
        "--scale",
        "0.01",
        "--timeout",
        "30",
    ]);
    let report = stratus_bench::coap::run_plan(&args.plan().unwrap())
        .await
        .unwrap();
    assert!(!report.ok);
    assert_eq!(report.acknowledged, 0);
    assert_eq!(report.errors, 64, "one timed-out request per client");
    let timeouts = report
        .figures
        .iter()
        .find(|f| f.name == "timeouts")
        .unwrap();
    assert_eq!(timeouts.value, Some(64.0));
    assert!(report.failure.unwrap().contains("no answer within 2 s"));
    drain.abort();
    server.shutdown(Duration::from_secs(2)).await;
}
