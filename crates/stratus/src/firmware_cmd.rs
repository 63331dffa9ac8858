//! `stratus firmware keygen|sign|verify|upload`: Ed25519 signing keys, signed manifests, local
//! verification and upload to a running server (as the admin), on top of `stratus-firmware`.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use reqwest::Method;
use stratus_firmware::{ImageDigest, Manifest, Policy, TrustedKeys};

use crate::admin::{self, AdminClient, ServerArgs, UsageError};

/// `stratus firmware …`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Keys: firmware.key is a PKCS#8 PEM Ed25519 private key (mode 0600), firmware.pub the
SubjectPublicKeyInfo PEM public key (both as OpenSSL writes them); base64 of the raw 32
bytes is accepted too. The manifest is JSON: version, size, sha256, signature, key_id,
hardware; the signature covers the compact, key-sorted JSON of the other fields.

Examples:
  stratus firmware keygen --out keys
  stratus firmware sign app.bin --key keys/firmware.key --version 1.4.0 --hardware board-a
  stratus firmware verify app.bin app.bin.manifest.json --pubkey keys/firmware.pub
  stratus firmware upload app.bin app.bin.manifest.json --server http://127.0.0.1:8080
  stratus serve --firmware-pubkey keys/firmware.pub")]
pub struct FirmwareArgs {
    #[command(subcommand)]
    command: FirmwareCommand,
}

#[derive(Subcommand, Debug)]
enum FirmwareCommand {
    /// Make a signing key pair: DIR/firmware.key (private, mode 0600) and DIR/firmware.pub.
    Keygen {
        /// Directory to write the two files to (created if missing; existing keys are kept).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign an image: write its manifest (JSON) next to it or to --out.
    #[command(disable_version_flag = true)]
    Sign {
        /// The firmware image.
        image: PathBuf,
        /// The private key file (firmware.key).
        #[arg(long, value_name = "KEYFILE")]
        key: PathBuf,
        /// The firmware version: numbers separated by dots, e.g. 1.2.3.
        #[arg(long, value_name = "V")]
        version: String,
        /// The hardware id the image is for (default: any hardware).
        #[arg(long, value_name = "H")]
        hardware: Option<String>,
        /// Where to write the manifest [default: IMAGE.manifest.json].
        #[arg(long, value_name = "MANIFEST")]
        out: Option<PathBuf>,
    },
    /// Check an image against its manifest and a public key: exit 0 when valid, 1 naming
    /// the reason otherwise.
    Verify {
        /// The firmware image.
        image: PathBuf,
        /// Its manifest.
        manifest: PathBuf,
        /// The trusted public key file (firmware.pub).
        #[arg(long, value_name = "PUBFILE")]
        pubkey: PathBuf,
    },
    /// Upload an image with its manifest to a running server; print the firmware id.
    Upload {
        /// The firmware image.
        image: PathBuf,
        /// Its manifest.
        manifest: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Runs `stratus firmware …`: `Ok(false)` when `verify` found the image invalid (the reason
/// is printed).
pub fn run(args: FirmwareArgs) -> anyhow::Result<bool> {
    match args.command {
        FirmwareCommand::Keygen { out } => keygen(&out).map(|()| true),
        FirmwareCommand::Sign {
            image,
            key,
            version,
            hardware,
            out,
        } => sign(&image, &key, &version, hardware.as_deref(), out).map(|()| true),
        FirmwareCommand::Verify {
            image,
            manifest,
            pubkey,
        } => verify(&image, &manifest, &pubkey),
        FirmwareCommand::Upload {
            image,
            manifest,
            server,
        } => upload(&image, &manifest, &server).map(|()| true),
    }
}

fn read_text(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read the {what} {}: {e}", path.display())).into())
}

fn digest_of(image: &Path) -> anyhow::Result<ImageDigest> {
    let file = File::open(image)
        .map_err(|e| UsageError(format!("cannot read the image {}: {e}", image.display())))?;
    ImageDigest::of_reader(std::io::BufReader::new(file))
        .with_context(|| format!("reading {}", image.display()))
}

fn read_manifest(path: &Path) -> anyhow::Result<Manifest> {
    let text = read_text(path, "manifest")?;
    Manifest::parse(text.as_bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn keygen(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join("firmware.key");
    let pub_path = dir.join("firmware.pub");
    for path in [&key_path, &pub_path] {
        if path.exists() {
            return Err(UsageError(format!(
                "{} already exists; move it away or choose another --out",
                path.display()
            ))
            .into());
        }
    }
    let key = stratus_firmware::generate_key()?;
    let private = stratus_firmware::signing_key_pem(&key)?;
    let public = stratus_firmware::public_key_pem(&key.verifying_key())?;
    write_new(&key_path, private.as_bytes(), 0o600)?;
    write_new(&pub_path, public.as_bytes(), 0o644)?;
    println!(
        "wrote {} and {} (key id {})",
        key_path.display(),
        pub_path.display(),
        stratus_firmware::key_id(&key.verifying_key())
    );
    Ok(())
}

/// Creates `path` (it must not exist) with `mode`, writes and syncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn sign(
    image: &Path,
    key_file: &Path,
    version: &str,
    hardware: Option<&str>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let key = stratus_firmware::parse_signing_key(&read_text(key_file, "key")?)
        .map_err(|e| UsageError(format!("{}: {e}", key_file.display())))?;
    let digest = digest_of(image)?;
    let manifest = stratus_firmware::sign(&key, &digest, version, hardware)
        .map_err(|e| UsageError(e.to_string()))?;
    let out = out.unwrap_or_else(|| {
        let mut name = image.as_os_str().to_owned();
        name.push(".manifest.json");
        PathBuf::from(name)
    });
    std::fs::write(&out, manifest.to_json_pretty())
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} (version {}, {} bytes, sha256 {})",
        out.display(),
        manifest.version,
        manifest.size,
        manifest.sha256
    );
    Ok(())
}

fn verify(image: &Path, manifest_path: &Path, pubkey: &Path) -> anyhow::Result<bool> {
    let key = stratus_firmware::parse_public_key(&read_text(pubkey, "public key")?)
        .map_err(|e| UsageError(format!("{}: {e}", pubkey.display())))?;
    let trusted: TrustedKeys = [key].into_iter().collect();
    let text = read_text(manifest_path, "manifest")?;
    let manifest = match Manifest::parse(text.as_bytes()) {
        Ok(m) => m,
        Err(e) => {
            println!("invalid: {e}");
            return Ok(false);
        }
    };
    let digest = digest_of(image)?;
    match stratus_firmware::verify(&manifest, &digest, &trusted, &Policy::default()) {
        Ok(()) => {
            println!(
                "valid: version {} signed by key {}",
                manifest.version, manifest.key_id
            );
            Ok(true)
        }
        Err(e) => {
            println!("invalid: {e}");
            Ok(false)
        }
    }
}

/// Uploads as `multipart/form-data` (manifest part, then image part), streaming the image
/// from its file.
fn upload(image: &Path, manifest_path: &Path, server: &ServerArgs) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    let manifest = read_manifest(manifest_path)?;
    let base = server.base_url();
    let secret = server.admin_secret()?;
    let boundary = format!("stratus-{:032x}", rand::random::<u128>());
    let mut head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"; \
         filename=\"manifest.json\"\r\nContent-Type: application/json\r\n\r\n"
    )
    .into_bytes();
    head.extend_from_slice(manifest.to_json_pretty().as_bytes());
    head.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; \
             filename=\"image.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    let tail = format!("\r\n--{boundary}--\r\n").into_bytes();
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let image = image.to_path_buf();
    admin::block_on(async move {
        let file = tokio::fs::File::open(&image)
            .await
            .map_err(|e| UsageError(format!("cannot read the image {}: {e}", image.display())))?;
        let size = file
            .metadata()
            .await
            .with_context(|| format!("reading {}", image.display()))?
            .len();
        let length = head.len() as u64 + size + tail.len() as u64;
        let head = bytes::Bytes::from(head);
        let tail = bytes::Bytes::from(tail);
        let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) })
            .chain(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024))
            .chain(futures_util::stream::once(async move { Ok(tail) }));
        let client = AdminClient::connect(base.clone(), &secret)
            .await
            .map_err(|e| admin::with_server(e, &base))?;
        let answer = client
            .send_body(
                Method::POST,
                "/api/v1/firmware",
                &content_type,
                length,
                reqwest::Body::wrap_stream(body),
            )
            .await
            .map_err(|e| admin::with_server(e, &base))?;
        let id = answer
            .get("id")
            .and_then(|v| v.as_str())
            .context("the server answered without a firmware id")?;
        println!("{id}");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[derive(clap::Parser, Debug)]
    #[command(name = "stratus", version, propagate_version = true)]
    struct Cli {
        #[command(subcommand)]
        command: Top,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Top {
        Firmware(FirmwareArgs),
    }

    #[test]
    fn the_command_line_is_consistent_and_sign_takes_version() {
        Cli::command().debug_assert();
        let cli = <Cli as clap::Parser>::try_parse_from([
            "stratus",
            "firmware",
            "sign",
            "a.bin",
            "--key",
            "k",
            "--version",
            "1.2.3",
        ])
        .unwrap();
        let Top::Firmware(FirmwareArgs {
            command: FirmwareCommand::Sign { version, out, .. },
        }) = cli.command
        else {
            panic!("not sign");
        };
        assert_eq!((version.as_str(), out), ("1.2.3", None));
    }
}
