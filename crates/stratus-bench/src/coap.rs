//! `stratus bench coap`: confirmable telemetry POSTs to Stratus's CoAP listener from 64
//! clients in a closed loop, the benchmark of issue #6 (target: 40,000 requests/s).
//!
//! The setup registers one device per client (`bench-<run>-coap-N`: the server bounds each
//! device's requests per second, `[telemetry] max_requests_per_sec`) with the admin
//! credentials over HTTP and fetches their access tokens; then every client — its own
//! connected UDP socket, so its own CoAP endpoint on the server — sends `POST
//! /telemetry?token=…` (CON, Content-Format JSON, one record `{"ts":T,"coap":21.5}`) and
//! waits for the answer before the next one. A token longer than one Uri-Query option may be
//! (255 bytes) would be split over several `token=` items, which the server joins in order.
//!
//! No CoAP client library and no per-request encoding: the datagram is encoded once with the
//! workspace codec (`stratus_coap::encode`), then only its message ID, token and the record's
//! fixed-width timestamp are patched in place. Answers are read from the fixed header: a
//! piggybacked 2.04 in an ACK with our message ID and token settles the request; an empty ACK
//! announces a separate response (which is acknowledged when it comes); anything else is an
//! error, and no answer within [`REQUEST_TIMEOUT`] (CoAP's `ACK_TIMEOUT`) is a timeout — on
//! loopback with 64 requests in flight, a lost datagram is the server's doing. Timed-out
//! requests are not retransmitted: the client counts them and moves on with a new message ID.
//!
//! The clients are split over [`TASKS`] tasks (one per runtime worker), each polling its share
//! with `FuturesUnordered`, so a wake-up costs one future poll, not a task switch.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use stratus_coap::{Code, ContentFormat, Message, MessageType, Token};
use tokio::net::UdpSocket;

use crate::args::{CoapPlan, Format};
use crate::group::{Group, TASKS};
use crate::http::client::{self, Client};
use crate::http::{now_ms, Latencies, Meter};
use crate::progress::percentile;
use crate::report::{Better, Figure, HttpReport, Target};

/// Concurrent clients (UDP sockets).
pub const CLIENTS: usize = 64;
/// Seconds the closed loop runs at scale 1 (never less than 1 s).
pub const SECS: f64 = 10.0;
/// Issue #6: at least this many confirmable requests/s.
pub const TARGET: f64 = 40_000.0;
/// How long a client waits for an answer (RFC 7252 `ACK_TIMEOUT`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The scenario's name in reports.
pub const SCENARIO: &str = "coap-telemetry";
/// The series every record writes.
pub const KEY: &str = "coap";

/// The longest `token=` item (a Uri-Query option holds at most 255 bytes).
const TOKEN_CHUNK: usize = 240;
/// Token length of every request.
const TOKEN_LEN: usize = 4;
/// Digits of a record's timestamp (epoch ms from 2001 to 2286).
const TS_DIGITS: usize = 13;
/// 2.04 Changed on the wire.
const CHANGED: u8 = (2 << 5) | 4;

/// How long the closed loop runs at `scale`.
pub fn duration(scale: f64) -> Duration {
    Duration::from_secs_f64((SECS * scale).max(1.0))
}

/// A telemetry POST encoded once, patched per request.
#[derive(Debug, Clone)]
pub struct Datagram {
    bytes: Vec<u8>,
    ts_at: usize,
}

impl Datagram {
    /// `POST /telemetry?token=…` (CON) with one record of [`KEY`].
    pub fn new(access_token: &str) -> anyhow::Result<Datagram> {
        let body = format!("{{\"ts\":{},\"{KEY}\":21.5}}", "0".repeat(TS_DIGITS));
        let mut m = Message::request(
            MessageType::Confirmable,
            Code::POST,
            0,
            Token::from_u64(0, TOKEN_LEN),
            "/telemetry",
        );
        m.options.set_content_format(ContentFormat::JSON);
        for item in token_items(access_token) {
            m.options.add_uri_query(&item);
        }
        let m = m.with_payload(body.clone().into_bytes());
        let bytes = stratus_coap::encode(&m)
            .context("encoding the request")?
            .to_vec();
        anyhow::ensure!(
            bytes.ends_with(body.as_bytes()) && bytes.len() > 4 + TOKEN_LEN,
            "unexpected request encoding"
        );
        let ts_at = bytes.len() - body.len() + "{\"ts\":".len();
        Ok(Datagram { bytes, ts_at })
    }

    /// The datagram's length.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it is empty (never).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A copy for one client to patch.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// Writes message ID `mid`, token `token` and timestamp `ts` into `out` (a copy of
    /// [`Datagram::bytes`]).
    pub fn patch(&self, out: &mut [u8], mid: u16, token: u32, ts: i64) {
        out[2..4].copy_from_slice(&mid.to_be_bytes());
        out[4..4 + TOKEN_LEN].copy_from_slice(&token.to_be_bytes());
        let mut n = ts.clamp(0, 9_999_999_999_999) as u64;
        for d in out[self.ts_at..self.ts_at + TS_DIGITS].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
}

/// `token=…` items a Uri-Query option can hold, joined in order by the server.
pub fn token_items(token: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut rest = token;
    while !rest.is_empty() {
        let mut cut = rest.len().min(TOKEN_CHUNK);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (chunk, tail) = rest.split_at(cut);
        items.push(format!("token={chunk}"));
        rest = tail;
    }
    items
}

/// What a received datagram means for the request with message ID `mid` and token `token`.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A piggybacked 2.04: done.
    Changed,
    /// An empty ACK: the response comes separately.
    Deferred,
    /// A separate 2.04 in a CON with this message ID, to acknowledge: done.
    SeparateChanged(u16),
    /// Another answer to this request: an error, described.
    Refused(String),
    /// Not about this request (a late answer to an earlier one).
    Stray,
}

/// Reads the fixed header of `d` (RFC 7252 §3).
pub fn classify(d: &[u8], mid: u16, token: u32) -> Answer {
    if d.len() < 4 || d[0] >> 6 != 1 {
        return Answer::Stray;
    }
    let kind = (d[0] >> 4) & 3;
    let tkl = usize::from(d[0] & 0x0f);
    let code = d[1];
    let their_mid = u16::from_be_bytes([d[2], d[3]]);
    let ours =
        |d: &[u8]| tkl == TOKEN_LEN && d.len() >= 4 + TOKEN_LEN && d[4..8] == token.to_be_bytes();
    match kind {
        // ACK
        2 if their_mid == mid => {
            if code == 0 {
                Answer::Deferred
            } else if !ours(d) {
                Answer::Refused("an ACK with another token".into())
            } else if code == CHANGED {
                Answer::Changed
            } else {
                Answer::Refused(describe(d))
            }
        }
        // RST
        3 if their_mid == mid => Answer::Refused("reset (RST) by the server".into()),
        // CON or NON: a separate response.
        0 | 1 if code != 0 && ours(d) => {
            if code == CHANGED {
                Answer::SeparateChanged(if kind == 0 { their_mid } else { 0 })
            } else {
                Answer::Refused(describe(d))
            }
        }
        _ => Answer::Stray,
    }
}

/// "4.01 Unauthorized: diagnostic" for an error response.
fn describe(d: &[u8]) -> String {
    let code = d[1];
    let payload: String = stratus_coap::decode(d)
        .map(|m| {
            String::from_utf8_lossy(&m.payload)
                .chars()
                .take(160)
                .collect()
        })
        .unwrap_or_default();
    format!("answered {}.{:02}: {payload}", code >> 5, code & 0x1f)
}

/// An empty ACK for message ID `mid`.
fn empty_ack(mid: u16) -> [u8; 4] {
    let [a, b] = mid.to_be_bytes();
    [0x60, 0, a, b]
}

/// Counters of a run that [`Meter`] does not have.
#[derive(Debug, Default)]
pub struct Extra {
    /// Requests that got no answer in time.
    pub timeouts: AtomicU64,
}

/// Registers one bench device per client (as a fleet would be: the server bounds each
/// device's requests per second) and returns their access tokens.
async fn setup(plan: &CoapPlan, run: u32) -> anyhow::Result<Vec<String>> {
    let host = plan.http_addr.to_string();
    let mut c = Client::connect(plan.http_addr)
        .await
        .with_context(|| format!("connecting to {}", plan.base_url))?;
    let admin = client::access_token(&mut c, &host, "admin", &plan.admin_secret)
        .await
        .context("the admin token (check --admin-secret / STRATUS_ADMIN_SECRET)")?;
    let mut tokens = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let id = format!("bench-{run:08x}-coap-{i}");
        let secret = client::register_device(&mut c, &host, &admin, &id).await?;
        tokens.push(client::access_token(&mut c, &host, &id, &secret).await?);
    }
    Ok(tokens)
}

/// One client's closed loop until `end`.
async fn client_loop(
    i: usize,
    socket: UdpSocket,
    datagram: Arc<Datagram>,
    base_ts: i64,
    end: Instant,
    meter: Arc<Meter>,
    extra: Arc<Extra>,
) -> anyhow::Result<()> {
    let mut out = datagram.bytes();
    let mut buf = vec![0u8; 2048];
    let mut latencies = Latencies::new(meter.progress.clone());
    // Spread the message IDs so that two clients' datagrams never look alike.
    let mut mid = (i as u16).wrapping_mul(1021);
    let mut seq: u64 = 0;
    while Instant::now() < end {
        mid = mid.wrapping_add(1);
        let token = ((i as u32) << 24) | (seq as u32 & 0x00ff_ffff);
        // Unique per client and request: every record is its own point.
        let ts = base_ts + (seq * CLIENTS as u64 + i as u64) as i64;
        datagram.patch(&mut out, mid, token, ts);
        meter.sent.fetch_add(1, Relaxed);
        let t0 = Instant::now();
        if let Err(e) = socket.send(&out).await {
            meter.error(|| format!("client {i}: send: {e}"));
            return Ok(());
        }
        let deadline = tokio::time::Instant::from_std(t0 + REQUEST_TIMEOUT);
        loop {
            let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_) => {
                    extra.timeouts.fetch_add(1, Relaxed);
                    meter.error(|| {
                        format!(
                            "client {i}: no answer within {} s",
                            REQUEST_TIMEOUT.as_secs_f64()
                        )
                    });
                    break;
                }
                Ok(Err(e)) => {
                    // ICMP port unreachable: nothing listens there.
                    meter.error(|| format!("client {i}: receive: {e}"));
                    return Ok(());
                }
                Ok(Ok(n)) => n,
            };
            match classify(&buf[..n], mid, token) {
                Answer::Changed => {
                    latencies.add(t0.elapsed());
                    meter.ack(1);
                    break;
                }
                Answer::SeparateChanged(con_mid) => {
                    latencies.add(t0.elapsed());
                    if buf[0] >> 4 & 3 == 0 {
                        let _ = socket.send(&empty_ack(con_mid)).await;
                    }
                    meter.ack(1);
                    break;
                }
                Answer::Refused(why) => {
                    meter.error(|| format!("client {i}: request {seq}: {why}"));
                    break;
                }
                Answer::Deferred | Answer::Stray => {}
            }
        }
        seq += 1;
    }
    Ok(())
}

/// The measured phase: [`CLIENTS`] clients for [`duration`]`(scale)`.
pub async fn load(
    coap_addr: SocketAddr,
    access_tokens: &[String],
    scale: f64,
    meter: Arc<Meter>,
    extra: Arc<Extra>,
) -> anyhow::Result<()> {
    let datagrams = access_tokens
        .iter()
        .map(|t| Datagram::new(t).map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!datagrams.is_empty(), "no access token to send with");
    let bind: SocketAddr = if coap_addr.is_ipv4() {
        ([127, 0, 0, 1], 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let mut sockets = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let s = UdpSocket::bind(bind)
            .await
            .context("binding a UDP socket")?;
        s.connect(coap_addr)
            .await
            .with_context(|| format!("connecting a UDP socket to {coap_addr}"))?;
        sockets.push(s);
    }
    // Two days back, then one millisecond apart per request and client.
    let base_ts = now_ms() - 2 * 86_400_000;
    let end = Instant::now() + duration(scale);
    let loops: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            client_loop(
                i,
                s,
                datagrams[i % datagrams.len()].clone(),
                base_ts,
                end,
                meter.clone(),
                extra.clone(),
            )
        })
        .collect();
    meter.progress.begin();
    Group::spawn(loops, TASKS).join().await?;
    meter.progress.end();
    Ok(())
}

/// Runs `stratus bench coap`: setup, the measured phase, one report (printed and returned).
pub async fn run_plan(plan: &CoapPlan) -> anyhow::Result<HttpReport> {
    let run = crate::http::run_tag();
    if plan.format == Format::Text {
        println!(
            "stratus bench coap → coap://{} (setup over {}; scale {}, timeout {} s, run {run:08x})",
            plan.coap_addr,
            plan.base_url,
            plan.scale,
            plan.timeout.as_secs_f64()
        );
    }
    let began = Instant::now();
    let loadavg_before = crate::procfs::loadavg();
    let meter = Meter::new(plan.server_pid);
    let extra = Arc::new(Extra::default());
    let (plan2, meter2, extra2) = (plan.clone(), meter.clone(), extra.clone());
    let mut task = tokio::spawn(async move {
        let tokens = setup(&plan2, run).await.context("setup")?;
        load(plan2.coap_addr, &tokens, plan2.scale, meter2, extra2).await
    });
    let outcome = tokio::time::timeout(plan.timeout, &mut task).await;
    meter.progress.end();
    let (timed_out, error) = match outcome {
        Err(_) => {
            task.abort();
            let _ = task.await;
            (true, None)
        }
        Ok(Err(join)) => (false, Some(format!("the load task failed: {join}"))),
        Ok(Ok(Err(e))) => (false, Some(format!("{e:#}"))),
        Ok(Ok(Ok(()))) => (false, None),
    };
    let report = build_report(
        plan,
        &meter,
        &extra,
        timed_out,
        error,
        began,
        loadavg_before,
    );
    let line = match plan.format {
        Format::Text => report.to_text(),
        Format::Json => report.to_json(),
    };
    println!("{line}");
    Ok(report)
}

fn build_report(
    plan: &CoapPlan,
    meter: &Meter,
    extra: &Extra,
    timed_out: bool,
    error: Option<String>,
    began: Instant,
    loadavg_before: Option<[f64; 3]>,
) -> HttpReport {
    let window = meter.progress.window();
    let sent = meter.sent.load(Relaxed);
    let acked = meter.acked.load(Relaxed);
    let errors = meter.errors.load(Relaxed);
    let timeouts = extra.timeouts.load(Relaxed);
    let throughput =
        (window.throughput_secs > 0.0 && acked > 0).then(|| acked as f64 / window.throughput_secs);
    let sorted = meter.progress.sorted_latencies();
    let ms = |p| percentile(&sorted, p).map(|ns| ns as f64 / 1e6);
    let figures = vec![
        Figure::new("throughput", throughput, "requests/s", Better::Higher),
        Figure::new("p50", ms(50.0), "ms", Better::Lower),
        Figure::new("p99", ms(99.0), "ms", Better::Lower),
        Figure::new("max", ms(100.0), "ms", Better::Lower),
        Figure::new("timeouts", Some(timeouts as f64), "requests", Better::Lower),
    ];
    let targets = vec![Target::check(
        &figures,
        "throughput",
        TARGET,
        Better::Higher,
    )];
    let failure = if timed_out {
        Some(format!(
            "timed out after {} s with {acked} of {sent} requests acknowledged",
            plan.timeout.as_secs_f64()
        ))
    } else if let Some(e) = error {
        Some(e)
    } else if errors > 0 {
        Some(format!(
            "{errors} of {sent} requests failed ({timeouts} timed out); the first: {}",
            meter.first_error().unwrap_or_default()
        ))
    } else if acked == 0 {
        Some("no request was acknowledged".into())
    } else {
        None
    };
    HttpReport {
        scenario: SCENARIO,
        ok: failure.is_none(),
        failure,
        timed_out,
        figures,
        targets,
        connections: CLIENTS as u32,
        requests: sent,
        sent,
        acknowledged: acked,
        errors,
        points: acked,
        wall_secs: window.throughput_secs,
        cpu_window_secs: window.cpu_window_secs,
        cpu_secs: window.generator_cpu_secs,
        server_cpu_secs: window.broker_cpu_secs,
        total_secs: began.elapsed().as_secs_f64(),
        loadavg_before,
        loadavg_after: crate::procfs::loadavg(),
        scale: plan.scale,
        notes: vec![format!(
            "{CLIENTS} clients (UDP sockets) on {TASKS} tasks, confirmable POST /telemetry, closed loop for {:.1} s",
            duration(plan.scale).as_secs_f64()
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_decodes_as_the_server_will_read_it() {
        let token = "x".repeat(600);
        let d = Datagram::new(&token).unwrap();
        let mut out = d.bytes();
        d.patch(&mut out, 0xbeef, 0x0102_0304, 1_700_000_000_123);
        let m = stratus_coap::decode(&out).unwrap();
        assert_eq!(m.message_type, MessageType::Confirmable);
        assert_eq!(m.code, Code::POST);
        assert_eq!(m.message_id, 0xbeef);
        assert_eq!(m.token.as_bytes(), &[1, 2, 3, 4]);
        assert_eq!(m.options.uri_path_string().unwrap(), "/telemetry");
        assert_eq!(
            m.options.content_format().unwrap(),
            Some(ContentFormat::JSON)
        );
        let items = m.options.uri_query().unwrap();
        assert_eq!(items.len(), 3);
        assert!(items.iter().all(|i| i.len() <= 255));
        let joined: String = items.iter().map(|i| &i[6..]).collect();
        assert_eq!(joined, token);
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["ts"], 1_700_000_000_123i64);
        assert_eq!(v[KEY], 21.5);
    }

    #[test]
    fn answers_are_told_apart() {
        let mid = 7u16;
        let tok = 0xaabb_ccddu32;
        let piggy = |code: u8| {
            let mut d = vec![0x64, code, 0, 7];
            d.extend_from_slice(&tok.to_be_bytes());
            d
        };
        assert_eq!(classify(&piggy(CHANGED), mid, tok), Answer::Changed);
        assert_eq!(classify(&[0x60, 0, 0, 7], mid, tok), Answer::Deferred);
        assert_eq!(classify(&[0x60, 0, 0, 8], mid, tok), Answer::Stray);
        assert!(matches!(
            classify(&[0x70, 0, 0, 7], mid, tok),
            Answer::Refused(_)
        ));
        let mut unauthorized = piggy((4 << 5) | 1);
        unauthorized.extend_from_slice(b"\xffbad token");
        match classify(&unauthorized, mid, tok) {
            Answer::Refused(why) => assert_eq!(why, "answered 4.01: bad token"),
            other => panic!("{other:?}"),
        }
        let mut separate = vec![0x44, CHANGED, 0x12, 0x34];
        separate.extend_from_slice(&tok.to_be_bytes());
        assert_eq!(
            classify(&separate, mid, tok),
            Answer::SeparateChanged(0x1234)
        );
        separate[4] ^= 1;
        assert_eq!(classify(&separate, mid, tok), Answer::Stray);
        assert_eq!(classify(&[0x60], mid, tok), Answer::Stray);
        assert_eq!(
            classify(&[0xa4, CHANGED, 0, 7, 0, 0, 0, 0], mid, tok),
            Answer::Stray
        );
        assert_eq!(empty_ack(0x1234), [0x60, 0, 0x12, 0x34]);
    }

    #[test]
    fn the_loop_runs_at_least_a_second() {
        assert_eq!(duration(1.0), Duration::from_secs(10));
        assert_eq!(duration(0.01), Duration::from_secs(1));
    }
}
