//! `stratus bench http --scale 0.001` against an in-process Stratus server: the command line
//! parses, the setup registers devices with the admin secret, every scenario runs with zero
//! errors, the answers pass their checks, and the JSON reports parse.

use std::time::Duration;

use clap::Parser;
use stratus_bench::args::{BenchCommand, HttpScenario};
use stratus_server::{Config, Overrides, Server};

/// `stratus` as far as `bench` goes.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    Bench(stratus_bench::BenchArgs),
}

async fn server() -> (Server, tempfile::TempDir, String) {
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
    // Generated on first start, unless STRATUS_ADMIN_SECRET set it.
    let secret = server
        .admin_secret
        .clone()
        .or_else(|| std::env::var("STRATUS_ADMIN_SECRET").ok())
        .expect("an admin secret");
    (server, dir, secret)
}

fn http_args(argv: &[&str]) -> stratus_bench::HttpArgs {
    let cli = Cli::try_parse_from(argv).unwrap();
    let Command::Bench(bench) = cli.command;
    match bench.command {
        BenchCommand::Http(args) => args,
        other => panic!("not bench http: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_scenario_runs_against_stratus_without_errors() {
    let (server, dir, secret) = server().await;
    let url = format!("http://{}", server.http_addr);
    let pid = std::process::id().to_string();
    let secret_file = dir.path().join("bench-secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let args = http_args(&[
        "stratus",
        "bench",
        "http",
        "--server",
        &url,
        "--scenario",
        "all",
        "--scale",
        "0.001",
        "--format",
        "json",
        "--timeout",
        "60",
        "--server-pid",
        &pid,
        "--admin-secret-file",
        secret_file.to_str().unwrap(),
    ]);
    let mut plan = args.plan().unwrap();
    // The file is the fallback: the environment may hold another server's secret.
    plan.admin_secret = secret;
    assert_eq!(plan.scenarios, HttpScenario::ALL);

    let reports = stratus_bench::http::run_plan(&plan).await.unwrap();
    assert_eq!(reports.len(), 3);
    for report in &reports {
        let line = report.to_json();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "{line}");
        assert_eq!(v["errors"], 0, "{line}");
        assert_eq!(v["timed_out"], false, "{line}");
        assert!(v["acknowledged"].as_u64().unwrap() > 0, "{line}");
        assert_eq!(v["acknowledged"], v["requests"], "{line}");
        assert!(v["cpu_secs"].is_number(), "{line}");
        assert!(v["server_cpu_secs"].is_number(), "{line}");
        assert!(v["loadavg_before"][0].is_number(), "{line}");
        let figures = v["figures"].as_array().unwrap();
        for f in figures {
            assert!(f["value"].as_f64().unwrap() > 0.0, "{line}");
        }
        let target = &v["targets"][0];
        assert!(target["met"].is_boolean(), "{line}");
        match v["scenario"].as_str().unwrap() {
            "ingest-batch" => {
                // 8 connections × max(1, round(625 × 0.001)) batches of 1,000.
                assert_eq!(v["points"], 8 * 1000, "{line}");
                assert_eq!(figures[0]["unit"], "points/s", "{line}");
            }
            "ingest-single" => {
                assert_eq!(v["points"], v["acknowledged"], "{line}");
                assert_eq!(figures[0]["unit"], "requests/s", "{line}");
            }
            "aggregate" => {
                // 10,000 points in one batch, then 5 checked queries.
                assert_eq!(v["points"], 10_000, "{line}");
                assert_eq!(v["requests"], 6, "{line}");
                assert_eq!(figures[0]["name"], "median", "{line}");
            }
            other => panic!("unexpected scenario {other}"),
        }
    }
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_admin_secret_fails_the_setup() {
    let (server, _dir, _secret) = server().await;
    let url = format!("http://{}", server.http_addr);
    let args = http_args(&[
        "stratus",
        "bench",
        "http",
        "--server",
        &url,
        "--admin-secret",
        "wrong",
        "--scale",
        "0.001",
        "--format",
        "json",
    ]);
    let mut plan = args.plan().unwrap();
    plan.admin_secret = "wrong".into();
    let err = stratus_bench::http::run_plan(&plan).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("admin token"), "{text}");
    assert!(text.contains("401"), "{text}");
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_telemetry_fails_the_scenario() {
    // A server whose telemetry endpoint answers 503 to everything: the setup works, every
    // ingestion request is an error, the report says so.
    use axum::routing::post;
    let (server, _dir, secret) = server().await;
    let real = server.http_addr;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = axum::Router::new()
        .route(
            "/api/v1/telemetry",
            post(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy") }),
        )
        .fallback(move |req: axum::extract::Request| forward(real, req));
    let serve = tokio::spawn(async move { axum::serve(listener, proxy).await });
    let args = http_args(&[
        "stratus",
        "bench",
        "http",
        "--server",
        &format!("http://{addr}"),
        "--scenario",
        "ingest-batch",
        "--scale",
        "0.001",
        "--admin-secret",
        "x",
    ]);
    let mut plan = args.plan().unwrap();
    plan.admin_secret = secret;
    let reports = stratus_bench::http::run_plan(&plan).await.unwrap();
    let r = &reports[0];
    assert!(!r.ok);
    assert_eq!(r.errors, 8);
    assert_eq!(r.acknowledged, 0);
    let failure = r.failure.clone().unwrap();
    assert!(failure.contains("503 busy"), "{failure}");
    serve.abort();
    server.shutdown(Duration::from_secs(2)).await;
}

/// Forwards one request to the real server (setup calls of the refusing server above).
async fn forward(
    to: std::net::SocketAddr,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let mut client = stratus_bench::http::client::Client::connect(to)
        .await
        .unwrap();
    let mut proto = stratus_bench::http::client::Proto::new(
        parts.method.clone(),
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/"),
        &to.to_string(),
        None,
        false,
    )
    .unwrap();
    for (name, value) in parts.headers.iter() {
        if name != axum::http::header::HOST {
            proto = proto.header(name.clone(), value.to_str().unwrap()).unwrap();
        }
    }
    let answer = client.send(&proto, bytes).await.unwrap();
    (answer.status, answer.body).into_response()
}
