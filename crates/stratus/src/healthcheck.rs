//! `stratus healthcheck`: one plain HTTP/1.1 GET of a running server's `/healthz`, for the
//! container image's `HEALTHCHECK` (the image is `FROM scratch`: no curl, no shell) and for
//! any supervisor that wants a probe. Exit 0 when the answer is 2xx, 1 otherwise.
//!
//! Without `--url` it asks the server this machine's configuration describes: `http.port`
//! and `server.bind` from `STRATUS_SECTION__KEY` variables (and `--config`), as `serve`
//! reads them, on loopback when the server binds every address. std's blocking sockets are
//! enough for one request; no runtime is started.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::Url;
use stratus_server::{Config, Overrides};

use crate::admin::UsageError;

/// Probe a running server's `/healthz`: exit 0 when it answers 2xx, 1 otherwise.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Without --url the URL is http://127.0.0.1:PORT/healthz, PORT being http.port as `stratus serve`
reads it (STRATUS_HTTP__PORT, --config, default 8080), and the address server.bind when it
names one address. The container image's HEALTHCHECK runs `stratus healthcheck`.

Examples:
  stratus healthcheck
  stratus healthcheck --url http://10.0.0.5:8080/healthz --timeout 2")]
pub struct HealthcheckArgs {
    /// The URL to GET (plain http) [default: from the configuration, see below].
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Configuration file of the server, to find its HTTP port.
    #[arg(long, value_name = "FILE", conflicts_with = "url")]
    config: Option<PathBuf>,
    /// Seconds the whole request may take.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    timeout: f64,
}

/// Runs the probe: `Ok(true)` healthy (a line on stdout), an error otherwise.
pub fn run(args: HealthcheckArgs) -> anyhow::Result<bool> {
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 3600.0) {
        return Err(UsageError(format!(
            "--timeout must be between 0 and 3600 seconds, not {}",
            args.timeout
        ))
        .into());
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let url = match args.url {
        Some(u) => u,
        None => {
            let config = Config::load(args.config.as_deref(), &Overrides::default())
                .map_err(|e| UsageError(format!("configuration error: {e}")))?;
            default_url(&config)
        }
    };
    let status = get_status(&url, timeout).with_context(|| url.clone())?;
    if !(200..300).contains(&status) {
        bail!("{url}: HTTP status {status}");
    }
    println!("healthy: {url} answered {status}");
    Ok(true)
}

/// `http://ADDR:PORT/healthz` of the server `config` describes.
fn default_url(config: &Config) -> String {
    let ip = match config.server.bind {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/healthz", SocketAddr::new(ip, config.http.port))
}

/// The status code of `GET url`, within `timeout` in all (resolving, connecting, answering).
fn get_status(url: &str, timeout: Duration) -> anyhow::Result<u16> {
    let parsed = Url::parse(url).map_err(|e| UsageError(format!("not a URL: {e}")))?;
    if parsed.scheme() != "http" {
        return Err(UsageError("only http:// URLs can be probed".into()).into());
    }
    let Some(host) = parsed.host_str() else {
        return Err(UsageError("the URL names no host".into()).into());
    };
    let port = parsed.port_or_known_default().unwrap_or(80);
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = (host.trim_matches(['[', ']']), port)
        .to_socket_addrs()
        .context("resolving the host")?
        .collect();
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left(deadline)?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(e).context("connecting"),
        (None, None) => bail!("{host} has no address"),
    };
    let mut target = parsed.path().to_string();
    if let Some(q) = parsed.query() {
        target.push('?');
        target.push_str(q);
    }
    let host_header = match parsed.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: stratus-healthcheck\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.set_write_timeout(Some(left(deadline)?))?;
    stream
        .write_all(request.as_bytes())
        .context("sending the request")?;
    // Only the status line matters: read until its end (it is short), never the whole body.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') {
        if head.len() > 8 * 1024 {
            bail!("no status line in the first 8 KiB of the answer");
        }
        stream.set_read_timeout(Some(left(deadline)?))?;
        let n = stream.read(&mut buf).context("reading the answer")?;
        if n == 0 {
            bail!("the server closed the connection without answering");
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status_line(&head)
}

/// The time left until `deadline`; an error once it has passed.
fn left(deadline: Instant) -> anyhow::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        bail!("timed out");
    }
    Ok(d)
}

/// The code of an `HTTP/1.x NNN reason` status line at the start of `head`.
fn parse_status_line(head: &[u8]) -> anyhow::Result<u16> {
    let end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..end]);
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    match (version.starts_with("HTTP/1."), code.parse::<u16>()) {
        (true, Ok(c)) if (100..=599).contains(&c) && code.len() == 3 => Ok(c),
        _ => bail!("not an HTTP answer: {:?}", line.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A one-shot server on loopback answering `answer` (after reading the request head),
    /// returning its port and the request it received.
    fn serve_once(answer: &'static [u8]) -> (u16, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer).unwrap();
            String::from_utf8(req).unwrap()
        });
        (port, handle)
    }

    #[test]
    fn a_2xx_answer_is_healthy_and_the_request_is_plain_http_1_1() {
        let (port, server) = serve_once(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}",
        );
        let url = format!("http://127.0.0.1:{port}/healthz");
        let healthy = run(HealthcheckArgs {
            url: Some(url),
            config: None,
            timeout: 5.0,
        })
        .unwrap();
        assert!(healthy);
        let req = server.join().unwrap();
        assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
            "{req}"
        );
        assert!(req.contains("\r\nConnection: close\r\n"), "{req}");
    }

    #[test]
    fn an_error_status_is_unhealthy() {
        let (port, server) = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = run(HealthcheckArgs {
            url: Some(format!("http://127.0.0.1:{port}/healthz")),
            config: None,
            timeout: 5.0,
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("HTTP status 503"), "{err:#}");
        assert_eq!(crate::admin::exit_code(&err), 1);
        server.join().unwrap();
    }

    #[test]
    fn nothing_listening_is_unhealthy_not_a_usage_error() {
        // A port that was free a moment ago.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = get_status(
            &format!("http://127.0.0.1:{port}/healthz"),
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert_eq!(crate::admin::exit_code(&err), 1, "{err:#}");
    }

    #[test]
    fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let start = Instant::now();
        let err = get_status(
            &format!("http://127.0.0.1:{port}/healthz"),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(3), "{err:#}");
        drop(listener);
    }

    #[test]
    fn bad_urls_are_usage_errors() {
        for url in ["https://127.0.0.1/healthz", "not a url", "http://"] {
            let err = get_status(url, Duration::from_secs(1)).unwrap_err();
            assert_eq!(crate::admin::exit_code(&err), 2, "{url}: {err:#}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 204 No Content\r\n").unwrap(),
            204
        );
        assert_eq!(parse_status_line(b"HTTP/1.0 200\r\n").unwrap(), 200);
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n"[..],
            b"HTTP/1.1 2000 x\r\n",
            b"HTTP/1.1 abc\r\n",
        ] {
            assert!(parse_status_line(bad).is_err());
        }
    }

    #[test]
    fn the_default_url_follows_the_configuration() {
        let mut c = Config::default();
        c.http.port = 9090;
        c.server.bind = "0.0.0.0".parse().unwrap();
        assert_eq!(default_url(&c), "http://127.0.0.1:9090/healthz");
        c.server.bind = "::".parse().unwrap();
        assert_eq!(default_url(&c), "http://[::1]:9090/healthz");
        c.server.bind = "10.1.2.3".parse().unwrap();
        assert_eq!(default_url(&c), "http://10.1.2.3:9090/healthz");
    }
}
