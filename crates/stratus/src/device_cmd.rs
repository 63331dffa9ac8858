//! `stratus device add|list|show|set|rm|rotate-secret|psk`: the device registry from the
//! command line, through a running server's HTTP API (as the `admin` client) or, with `--data-dir`,
//! directly on a data dir's store.
//!
//! Both ways run the same registry code (`stratus_server::api::devices`), print the same JSON
//! (`--json`) and write the same audit entries (the actor is `admin` through the API,
//! `cli:$USER` on a data dir). Without `--data-dir` and `--server`, a command that finds no
//! server at the default address falls back to `./stratus-data` when it holds a store, and
//! says so on stderr.
//!
//! Changing a data dir under a running server is safe for the data (SQLite arbitrates), but
//! that server keeps its in-memory directory of credentials: a device added or removed there
//! is seen by the server after its next restart. Use the API when a server runs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Map, Value};
use stratus_server::api::devices::{self as registry, CreatedDevice, DeviceView, SecretView};
use stratus_server::coap::psk::PskSealer;
use stratus_store::{SqliteOptions, StoreHandle};

use crate::admin::{self, AdminClient, RequestError, ServerArgs, UsageError};

/// `stratus device …`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
The admin secret comes from STRATUS_ADMIN_SECRET, else from --admin-secret-file.
With --data-dir DIR the command works on DIR/stratus.db directly (no server needed).
Without --server and --data-dir, when no server answers at the default address and
./stratus-data (or $STRATUS_SERVER__DATA_DIR) holds a store, that store is used (a note says
so on stderr).

Examples:
  stratus device add pump-7 --attr site=north --attr floor=2
  stratus device list --json
  stratus device set pump-7 --require-freshness on   (its messages must carry sent + nonce)
  stratus device set pump-7 --attr floor=3 --attr old-key=null
  stratus device rotate-secret pump-7
  stratus device psk pump-7 --secret \"$SECRET\"   (the CoAPS key: coap-client -u pump-7 -k KEY)
  stratus device rm pump-7 --data-dir /var/lib/stratus")]
pub struct DeviceArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Work on this data dir's store directly instead of a running server.
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Print JSON (the API's shapes) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: DeviceCommand,
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Register a device and print its secret (shown this once).
    Add {
        /// Device id: [A-Za-z0-9._-]{1,64}.
        id: String,
        /// An attribute; VALUE is read as JSON when it parses (2, true, {"a":1}), else as text.
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
    },
    /// List every device.
    #[command(visible_alias = "ls")]
    List,
    /// Show one device: attributes, desired and reported configuration, firmware.
    Show {
        /// Device id.
        id: String,
    },
    /// Change a device: merge attributes, turn its own freshness (replay) policy on or off.
    /// The same merge patch as `PATCH /api/v1/devices/{id}`.
    Set {
        /// Device id.
        id: String,
        /// Require `sent` and `nonce` in every telemetry message of this device (replays and
        /// messages without them are refused: HTTP 409, CoAP 4.09, MQTT v5 0x99).
        #[arg(long, value_name = "on|off", value_parser = parse_switch)]
        require_freshness: Option<bool>,
        /// An attribute to set, merged into the others; VALUE is read as JSON when it parses,
        /// else as text; `KEY=null` removes the attribute.
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
    },
    /// Delete a device with its telemetry; its credentials stop working.
    #[command(visible_alias = "remove")]
    Rm {
        /// Device id.
        id: String,
    },
    /// Give a device a new secret and print it; the old one stops working.
    RotateSecret {
        /// Device id.
        id: String,
    },
    /// Print a device's CoAPS pre-shared key, computed from its secret (no server needed):
    /// base64url(HMAC-SHA256(secret, "stratus-coap-psk/v1:" + id)) without padding. The PSK
    /// identity is the device id, e.g. `coap-client -u ID -k PSK coaps://host/telemetry`.
    Psk {
        /// Device id (the PSK identity).
        id: String,
        /// The device's secret.
        #[arg(long, env = "STRATUS_DEVICE_SECRET", hide_env_values = true)]
        secret: String,
    },
}

/// Runs `stratus device …`.
pub fn run(args: DeviceArgs) -> anyhow::Result<()> {
    if let DeviceCommand::Add { id, .. }
    | DeviceCommand::Set { id, .. }
    | DeviceCommand::Show { id }
    | DeviceCommand::Rm { id }
    | DeviceCommand::RotateSecret { id }
    | DeviceCommand::Psk { id, .. } = &args.command
    {
        registry::check_device_id(id).map_err(|e| UsageError(e.to_string()))?;
    }
    if let DeviceCommand::Psk { id, secret } = &args.command {
        // Pure computation: no server, no store.
        print!(
            "{}",
            render(&args.command, &psk_answer(id, secret), args.json)
        );
        return Ok(());
    }
    let body = match &args.command {
        DeviceCommand::Add { attrs, .. } => parse_attributes(attrs)?,
        DeviceCommand::Set {
            attrs,
            require_freshness,
            ..
        } => set_patch(attrs, *require_freshness)?,
        _ => Value::Null,
    };
    admin::block_on(async move {
        let backend = Backend::open(&args).await?;
        let out = backend.execute(&args.command, body).await?;
        print!("{}", render(&args.command, &out, args.json));
        Ok(())
    })
}

/// `KEY=VALUE` pairs as an attributes object.
fn parse_attributes(pairs: &[String]) -> anyhow::Result<Value> {
    let mut map = Map::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(UsageError(format!("--attr {pair:?}: expected KEY=VALUE")).into());
        };
        if key.is_empty() {
            return Err(UsageError(format!("--attr {pair:?}: the key is empty")).into());
        }
        let value =
            serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        map.insert(key.to_string(), value);
    }
    Ok(Value::Object(map))
}

/// `on`/`off` (also true/false, yes/no, 1/0).
fn parse_switch(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

/// The merge patch of `stratus device set` (a usage error when it would change nothing).
fn set_patch(attrs: &[String], require_freshness: Option<bool>) -> anyhow::Result<Value> {
    let mut patch = Map::new();
    if !attrs.is_empty() {
        patch.insert("attributes".into(), parse_attributes(attrs)?);
    }
    if let Some(on) = require_freshness {
        patch.insert("require_freshness".into(), Value::Bool(on));
    }
    if patch.is_empty() {
        return Err(UsageError(
            "stratus device set: nothing to change (give --require-freshness or --attr)".into(),
        )
        .into());
    }
    Ok(Value::Object(patch))
}

/// Where the registry is.
enum Backend {
    Server(AdminClient),
    Store(StoreHandle, PskSealer),
}

fn open_store(dir: &Path) -> anyhow::Result<StoreHandle> {
    let db = dir.join(stratus_server::persist::DATABASE_FILE);
    if !db.is_file() {
        return Err(UsageError(format!(
            "no Stratus data in {} ({} does not exist)",
            dir.display(),
            db.display()
        ))
        .into());
    }
    // Changes are audited like the server's, so with the data dir's audit key (created here
    // when a data dir from before the key has none, as the server would at its next start).
    let audit_key = stratus_server::audit::open_audit_key(dir)
        .with_context(|| format!("opening the audit key of {}", dir.display()))?;
    let options = SqliteOptions {
        audit_key: Some(audit_key),
        ..SqliteOptions::default()
    };
    StoreHandle::open_sqlite_with(&db, &options)
        .with_context(|| format!("opening {}", db.display()))
}

/// The data dir's CoAPS key sealer (`coap-psk.key`, created when missing, as the server does).
fn open_sealer(dir: &Path) -> anyhow::Result<PskSealer> {
    PskSealer::load_or_create(dir).with_context(|| {
        format!(
            "reading {}",
            dir.join(stratus_server::coap::psk::PSK_KEY_FILE).display()
        )
    })
}

impl Backend {
    async fn open(args: &DeviceArgs) -> anyhow::Result<Backend> {
        if let Some(dir) = &args.data_dir {
            return Ok(Backend::Store(open_store(dir)?, open_sealer(dir)?));
        }
        let base = args.server.base_url();
        let secret = args.server.admin_secret()?;
        let fallback = admin::default_data_dir();
        let may_fall_back = args.server.server.is_none()
            && fallback
                .join(stratus_server::persist::DATABASE_FILE)
                .is_file();
        match AdminClient::connect(base.clone(), &secret).await {
            Ok(client) => Ok(Backend::Server(client)),
            Err(RequestError::Unreachable(why)) if may_fall_back => {
                eprintln!(
                    "stratus: no server at {base} ({why}); using the data dir {} directly",
                    fallback.display()
                );
                Ok(Backend::Store(
                    open_store(&fallback)?,
                    open_sealer(&fallback)?,
                ))
            }
            Err(e) => Err(admin::with_server(e, &base)),
        }
    }

    /// Runs the command; the answer in the API's JSON shape. `body` is what the command
    /// sends: the attributes of `add`, the merge patch of `set`.
    async fn execute(&self, command: &DeviceCommand, body: Value) -> anyhow::Result<Value> {
        match self {
            Backend::Server(client) => {
                let (method, path, body) = match command {
                    DeviceCommand::Add { id, .. } => (
                        Method::POST,
                        "/api/v1/devices".to_string(),
                        Some(json!({"id": id, "attributes": body})),
                    ),
                    DeviceCommand::List => return list_all(client).await,
                    DeviceCommand::Psk { id, secret } => return Ok(psk_answer(id, secret)),
                    DeviceCommand::Show { id } => {
                        (Method::GET, format!("/api/v1/devices/{id}"), None)
                    }
                    DeviceCommand::Set { id, .. } => {
                        (Method::PATCH, format!("/api/v1/devices/{id}"), Some(body))
                    }
                    DeviceCommand::Rm { id } => {
                        (Method::DELETE, format!("/api/v1/devices/{id}"), None)
                    }
                    DeviceCommand::RotateSecret { id } => {
                        (Method::POST, format!("/api/v1/devices/{id}/secret"), None)
                    }
                };
                let answer = client.call(method, &path, body.as_ref()).await?;
                Ok(match command {
                    DeviceCommand::Rm { id } => json!({"id": id, "deleted": true}),
                    _ => answer,
                })
            }
            Backend::Store(store, psk) => execute_on_store(store, psk, command, body).await,
        }
    }
}

async fn list_all(client: &AdminClient) -> anyhow::Result<Value> {
    let mut devices = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/devices?limit=1000&after={a}"),
            None => "/api/v1/devices?limit=1000".to_string(),
        };
        let page = client.call(Method::GET, &path, None).await?;
        if let Some(list) = page.get("devices").and_then(Value::as_array) {
            devices.extend(list.iter().cloned());
        }
        match page.get("next").and_then(Value::as_str) {
            Some(next) if after.as_deref() != Some(next) => after = Some(next.to_string()),
            _ => break,
        }
    }
    Ok(Value::Array(devices))
}

fn actor() -> String {
    let user = std::env::var("USER").unwrap_or_default();
    let user: String = user.chars().filter(|c| !c.is_control()).take(64).collect();
    if user.is_empty() {
        "cli".to_string()
    } else {
        format!("cli:{user}")
    }
}

/// Runs the command on a store; `body` as for [`Backend::execute`].
async fn execute_on_store(
    store: &StoreHandle,
    psk: &PskSealer,
    command: &DeviceCommand,
    body: Value,
) -> anyhow::Result<Value> {
    let actor = actor();
    let not_found = |id: &str| anyhow::anyhow!("device {id:?} not found");
    Ok(match command {
        DeviceCommand::Add { id, .. } => {
            let r = registry::register(store, psk, &actor, id, body).await?;
            serde_json::to_value(CreatedDevice {
                device: DeviceView::from(&r.device),
                secret: r.secret,
            })?
        }
        DeviceCommand::List => {
            let mut devices = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = store.list_devices(after.as_deref(), 1000).await?;
                let Some(last) = page.last().map(|d| d.id.clone()) else {
                    break;
                };
                devices.extend(page.iter().map(DeviceView::from));
                after = Some(last);
            }
            serde_json::to_value(devices)?
        }
        DeviceCommand::Show { id } => {
            let device = store.device(id).await?.ok_or_else(|| not_found(id))?;
            serde_json::to_value(DeviceView::from(&device))?
        }
        DeviceCommand::Set { id, .. } => {
            let device = registry::apply_patch(store, &actor, id, body).await?;
            serde_json::to_value(DeviceView::from(&device))?
        }
        DeviceCommand::Rm { id } => {
            registry::remove(store, &actor, id).await?;
            json!({"id": id, "deleted": true})
        }
        DeviceCommand::RotateSecret { id } => {
            let rotated = registry::rotate_secret(store, psk, &actor, id).await?;
            serde_json::to_value(SecretView {
                id: id.clone(),
                secret: rotated.secret,
            })?
        }
        DeviceCommand::Psk { id, secret } => psk_answer(id, secret),
    })
}

/// `{"id", "identity", "psk"}`: the CoAPS credentials of device `id` with secret `secret`.
fn psk_answer(id: &str, secret: &str) -> Value {
    json!({
        "id": id,
        "identity": id,
        "psk": stratus_server::coap::psk::device_psk(secret, id),
    })
}

// ---- output ------------------------------------------------------------------------------

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// What the command prints (ends with a newline).
fn render(command: &DeviceCommand, out: &Value, as_json: bool) -> String {
    if as_json {
        return format!(
            "{}\n",
            serde_json::to_string_pretty(out).unwrap_or_default()
        );
    }
    match command {
        DeviceCommand::Add { .. } => format!(
            "registered device {}\nsecret: {}\n(the secret is shown only now: store it on the device)\n",
            text(out, "id"),
            text(out, "secret")
        ),
        DeviceCommand::RotateSecret { .. } => format!(
            "new secret for device {}: {}\n(the old secret and its tokens no longer work)\n",
            text(out, "id"),
            text(out, "secret")
        ),
        DeviceCommand::Rm { .. } => format!("deleted device {}\n", text(out, "id")),
        DeviceCommand::Show { .. } | DeviceCommand::Set { .. } => render_device(out),
        DeviceCommand::List => render_table(out.as_array().map_or(&[][..], Vec::as_slice)),
        DeviceCommand::Psk { .. } => format!("{}\n", text(out, "psk")),
    }
}

fn render_device(d: &Value) -> String {
    let compact = |v: Option<&Value>| v.map_or_else(|| "-".to_string(), Value::to_string);
    let mut s = String::new();
    s.push_str(&format!("id:         {}\n", text(d, "id")));
    s.push_str(&format!("created:    {}\n", text(d, "created_at")));
    s.push_str(&format!("last seen:  {}\n", text(d, "last_seen")));
    s.push_str(&format!("attributes: {}\n", compact(d.get("attributes"))));
    let desired = d.get("desired").cloned().unwrap_or(Value::Null);
    s.push_str(&format!(
        "desired:    version {} ({}) {}\n",
        text(&desired, "version"),
        text(&desired, "updated_at"),
        compact(desired.get("config"))
    ));
    match d.get("reported") {
        Some(r @ Value::Object(_)) => s.push_str(&format!(
            "reported:   ({}) {}\n",
            text(r, "updated_at"),
            compact(r.get("config"))
        )),
        _ => s.push_str("reported:   -\n"),
    }
    s.push_str(&format!("firmware:   {}\n", text(d, "firmware")));
    let fresh = match d.get("require_freshness") {
        Some(Value::Bool(true)) => "required (sent + nonce in every message)",
        _ => "not required of this device",
    };
    s.push_str(&format!("freshness:  {fresh}\n"));
    s
}

fn render_table(devices: &[Value]) -> String {
    let rows: Vec<[String; 4]> = devices
        .iter()
        .map(|d| {
            let version = d
                .get("desired")
                .map_or_else(|| "-".to_string(), |c| text(c, "version"));
            [
                text(d, "id"),
                text(d, "last_seen"),
                version,
                d.get("attributes")
                    .map_or_else(String::new, Value::to_string),
            ]
        })
        .collect();
    let header = [
        "ID".to_string(),
        "LAST SEEN".to_string(),
        "CONFIG".to_string(),
        "ATTRIBUTES".to_string(),
    ];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut s = String::new();
    for r in std::iter::once(&header).chain(rows.iter()) {
        s.push_str(format!("{:<w0$}  {:<w1$}  {:<w2$}  {}", r[0], r[1], r[2], r[3]).trim_end());
        s.push('\n');
    }
    s.push_str(&format!(
        "{} device{}\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_json_when_they_parse_else_text() {
        let attrs = parse_attributes(&[
            "floor=2".into(),
            "on=true".into(),
            "site=north".into(),
            "serial=007".into(),
            "tags=[\"a\"]".into(),
            "eq=a=b".into(),
            "empty=".into(),
        ])
        .unwrap();
        assert_eq!(
            attrs,
            json!({"floor": 2, "on": true, "site": "north", "serial": "007", "tags": ["a"],
                   "eq": "a=b", "empty": ""})
        );
        for bad in ["noequals", "=v"] {
            let e = parse_attributes(&[bad.into()]).unwrap_err();
            assert_eq!(admin::exit_code(&e), 2);
        }
    }

    #[test]
    fn set_needs_something_to_change_and_takes_on_or_off() {
        assert_eq!(
            set_patch(&[], Some(false)).unwrap(),
            json!({"require_freshness": false})
        );
        assert_eq!(
            set_patch(&["a=1".into()], None).unwrap(),
            json!({"attributes": {"a": 1}})
        );
        let e = set_patch(&[], None).unwrap_err();
        assert_eq!(admin::exit_code(&e), 2);
        assert_eq!(parse_switch("ON"), Ok(true));
        assert_eq!(parse_switch("off"), Ok(false));
        assert!(parse_switch("maybe").is_err());
    }

    #[test]
    fn the_table_lines_up() {
        let devices = vec![
            json!({"id": "a", "last_seen": null, "desired": {"version": 0}, "attributes": {}}),
            json!({"id": "long-id", "last_seen": "2024-01-01T00:00:00.000Z",
                   "desired": {"version": 12}, "attributes": {"k": "v"}}),
        ];
        let table = render_table(&devices);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "ID       LAST SEEN                 CONFIG  ATTRIBUTES"
        );
        assert_eq!(lines[1], "a        -                         0       {}");
        assert_eq!(
            lines[2],
            "long-id  2024-01-01T00:00:00.000Z  12      {\"k\":\"v\"}"
        );
        assert_eq!(lines[3], "2 devices");
    }

    /// The data-dir mode end to end on a fresh store: add, show, list, rotate, rm, with
    /// audit entries for the changes.
    #[test]
    fn the_data_dir_mode_works_on_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(stratus_server::persist::DATABASE_FILE);
        admin::block_on(async {
            let store = StoreHandle::open_sqlite(&db)?;
            let psk = PskSealer::load_or_create(dir.path())?;
            let add = DeviceCommand::Add {
                id: "d1".into(),
                attrs: vec![],
            };
            let created = execute_on_store(&store, &psk, &add, json!({"k": 1})).await?;
            assert_eq!(created["attributes"], json!({"k": 1}));
            assert_eq!(created["secret"].as_str().unwrap().len(), 43);
            let shown = execute_on_store(
                &store,
                &psk,
                &DeviceCommand::Show { id: "d1".into() },
                Value::Null,
            )
            .await?;
            assert!(shown.get("secret").is_none());
            assert!(!shown.to_string().contains("argon2"));
            assert_eq!(shown["require_freshness"], json!(false));
            let set = DeviceCommand::Set {
                id: "d1".into(),
                require_freshness: Some(true),
                attrs: vec!["k=null".into(), "site=north".into()],
            };
            let patch = set_patch(&["k=null".into(), "site=north".into()], Some(true))?;
            let changed = execute_on_store(&store, &psk, &set, patch).await?;
            assert_eq!(changed["require_freshness"], json!(true));
            assert_eq!(changed["attributes"], json!({"site": "north"}));
            assert!(render(&set, &changed, false).contains("freshness:  required"));
            assert_eq!(store.devices_requiring_freshness().await?, ["d1"]);
            let listed = execute_on_store(&store, &psk, &DeviceCommand::List, Value::Null).await?;
            assert_eq!(listed.as_array().unwrap().len(), 1);
            let rotated = execute_on_store(
                &store,
                &psk,
                &DeviceCommand::RotateSecret { id: "d1".into() },
                Value::Null,
            )
            .await?;
            assert_ne!(rotated["secret"], created["secret"]);
            execute_on_store(
                &store,
                &psk,
                &DeviceCommand::Rm { id: "d1".into() },
                Value::Null,
            )
            .await?;
            let gone = execute_on_store(
                &store,
                &psk,
                &DeviceCommand::Show { id: "d1".into() },
                Value::Null,
            )
            .await;
            assert!(gone.is_err());
            let actions: Vec<String> = store
                .list_audit(1, 10)
                .await?
                .into_iter()
                .map(|e| e.action)
                .collect();
            assert_eq!(
                actions,
                [
                    "device.create",
                    "device.update",
                    "device.secret.rotate",
                    "device.delete"
                ]
            );
            Ok(())
        })
        .unwrap();
    }
}
