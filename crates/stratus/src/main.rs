//! `stratus`: the command-line entry point. Parses arguments, loads configuration and hands
//! over to `stratus-server`; everything of substance lives in the library crates.
//!
//! The admin subcommands (`stratus device`, `stratus audit`) talk to a running server over HTTP
//! with `reqwest` (async on tokio, reusing the hyper/rustls/ring the server already builds;
//! rustls with webpki roots so `--server https://…` works) or open a data dir's store with
//! `stratus-store` directly. `stratus firmware` signs and verifies with `stratus-firmware`;
//! its `upload` streams the image from the file into the multipart body (reqwest's `stream`
//! feature with tokio-util's `ReaderStream`, `futures-util` and `bytes` to chain the parts).
//! `libc` for one call, glibc's `mallopt`, made first thing in `main` (see `alloc_tuning`);
//! `rustix` (safe system calls) for the resource limits of `stratus sim` and the umask of
//! `stratus serve`.
//! `stratus tls init` (see `tls_cmd`) makes its CA and certificates with `rcgen` (with its
//! `x509-parser` feature, to sign with an existing CA), reads them back with `x509-parser` and
//! `rustls-pki-types` (both already the server's), and edits the configuration file with
//! `toml_edit`, the format-preserving TOML editor under the `toml` crate figment already
//! uses (so a user's comments and layout survive).

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use stratus_server::{Config, Overrides, Server};

use alloc_tuning::pin_mmap_threshold;

mod admin;
mod alloc_tuning;
mod audit_cmd;
mod device_cmd;
mod firmware_cmd;
mod healthcheck;
mod sim;
mod tls_cmd;

/// Stratus: an IoT cloud in one binary.
#[derive(Parser, Debug)]
#[command(name = "stratus", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: MQTT broker and HTTP API.
    Serve(ServeArgs),
    /// Load-test a broker on this machine (loopback only).
    Bench(stratus_bench::BenchArgs),
    /// Manage devices on a running server (or on a data dir when none runs).
    Device(device_cmd::DeviceArgs),
    /// Sign, verify and upload firmware (Ed25519 keys, signed manifests).
    Firmware(firmware_cmd::FirmwareArgs),
    /// Verify the audit log (its keyed hash chain and its exported head) or print its head.
    Audit(audit_cmd::AuditArgs),
    /// Simulate a fleet of devices (MQTT, HTTP, CoAP) against a running server.
    Sim(sim::SimArgs),
    /// TLS without a PKI: `stratus tls init` makes a local CA and a server certificate and
    /// wires them into the configuration.
    Tls(tls_cmd::TlsArgs),
    /// Probe a running server's /healthz: exit 0 when healthy, 1 when not (the container's
    /// HEALTHCHECK).
    Healthcheck(healthcheck::HealthcheckArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Configuration file (TOML); flags and STRATUS_SECTION__KEY variables override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for persistent state [default: ./stratus-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address every listener binds to [default: 127.0.0.1].
    #[arg(long, value_name = "ADDR")]
    bind: Option<IpAddr>,
    /// HTTP port; 0 picks a free one [default: 8080].
    #[arg(long, value_name = "N")]
    http_port: Option<u16>,
    /// MQTT port; 0 picks a free one [default: 1883].
    #[arg(long, value_name = "N")]
    mqtt_port: Option<u16>,
    /// CoAP UDP port; 0 picks a free one [default: 5683].
    #[arg(long, value_name = "N")]
    coap_port: Option<u16>,
    /// Let MQTT clients without credentials connect and use any topic outside `devices/`.
    #[arg(long)]
    allow_anonymous: bool,
    /// A public key (PEM or base64) whose firmware signatures are trusted; repeatable.
    /// Replaces `[firmware] pubkeys` of the configuration when given.
    #[arg(long, value_name = "FILE")]
    firmware_pubkey: Vec<PathBuf>,
    /// Also run a simulated fleet (a dozen devices over MQTT, HTTP and CoAP) so the dashboard
    /// is alive at once.
    #[arg(long, env = "STRATUS_DEMO", value_parser = clap::builder::BoolishValueParser::new())]
    demo: bool,
}

fn main() -> ExitCode {
    pin_mmap_threshold();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => stratus_bench::run(args),
        Command::Device(args) => report(device_cmd::run(args).map(|()| true)),
        Command::Firmware(args) => report(firmware_cmd::run(args)),
        Command::Audit(args) => report(audit_cmd::run(args)),
        Command::Sim(args) => report(sim::run(args)),
        Command::Tls(args) => report(tls_cmd::run(args)),
        Command::Healthcheck(args) => report(healthcheck::run(args)),
    }
}

/// The exit code of an admin subcommand: 0 done, 1 a negative answer (already printed) or a
/// runtime failure, 2 a usage error; failures are printed on one line.
fn report(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("stratus: {e:#}");
            ExitCode::from(admin::exit_code(&e))
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    // Whatever the server creates (the data dir, the database and its WAL, keys, firmware
    // images) is for its own user only, whatever umask it was started with; the data dir
    // module also sets these modes explicitly and narrows what an older start left wider.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let overrides = Overrides {
        bind: args.bind,
        data_dir: args.data_dir,
        http_port: args.http_port,
        mqtt_port: args.mqtt_port,
        coap_port: args.coap_port,
        allow_anonymous: args.allow_anonymous,
        firmware_pubkeys: args.firmware_pubkey,
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stratus: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if config.tls.enabled() {
        if let Err(e) = stratus_server::tls::acceptor(&config.tls, &[]) {
            eprintln!("stratus: configuration error: {e}");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stratus: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config, args.demo)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stratus: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config, demo: bool) -> anyhow::Result<()> {
    // Handlers first: a signal sent as soon as the listening lines appear must be caught.
    let signals = Signals::install()?;
    let data_dir = config.server.data_dir.clone();
    let server = Server::start(config).await?;
    println!("listening mqtt {}", server.mqtt_addr);
    println!("listening http {}", server.http_addr);
    println!("listening ws {}", server.http_addr);
    println!("listening coap {}", server.coap_addr);
    if let Some(addr) = server.mqtts_addr {
        println!("listening mqtts {addr}");
    }
    if let Some(addr) = server.https_addr {
        println!("listening https {addr}");
    }
    if let Some(addr) = server.coaps_addr {
        println!("listening coaps {addr}");
    }
    if let Some(secret) = &server.admin_secret {
        // Shown once; the file keeps it for `stratus device …` and the dashboard.
        println!(
            "admin secret {secret} (client id admin; saved to {})",
            data_dir.join("admin-secret").display()
        );
    }
    let demo = demo.then(|| sim::start_demo(&server, &data_dir));
    tracing::info!(mqtt = %server.mqtt_addr, http = %server.http_addr, "stratus is running");
    signals.wait().await;
    let stopping = std::time::Instant::now();
    tracing::info!("shutting down");
    if let Some(fleet) = demo {
        sim::stop_demo(fleet).await;
    }
    server.shutdown(Duration::from_secs(4)).await;
    // The last line of a clean stop (the container test looks for it).
    tracing::info!(took_ms = stopping.elapsed().as_millis() as u64, "stopped");
    Ok(())
}

/// SIGTERM and SIGINT, installed before the server announces itself.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
