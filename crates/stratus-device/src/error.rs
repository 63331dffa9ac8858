//! The SDK's one error type.

use std::path::PathBuf;

/// What went wrong. Transient failures (the server unreachable, a dropped connection) are
/// not errors of the API: the device buffers and retries on its own, and
/// [`Device::stats`](crate::Device::stats) and [`Device::status`](crate::Device::status) tell
/// what is going on. Errors are for what the caller must fix or decide.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A builder setting is wrong (bad URL, bad id, unusable certificate…); names the setting.
    #[error("invalid setting {setting}: {reason}")]
    Config {
        /// The builder method or option.
        setting: &'static str,
        /// Why.
        reason: String,
    },
    /// The server refused the device's id and secret (OAuth `invalid_client`, MQTT bad
    /// credentials): the device was deleted or its secret rotated.
    #[error("the server refused the credentials of device {id}: {reason}")]
    Unauthorized {
        /// The device id.
        id: String,
        /// The server's description.
        reason: String,
    },
    /// A record the server could never accept (reserved or overlong key, nested value…).
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// The offline buffer is full and the overflow policy is [`Overflow::Reject`](crate::Overflow::Reject).
    #[error("the offline buffer is full ({capacity} records)")]
    BufferFull {
        /// The buffer's capacity.
        capacity: usize,
    },
    /// Reading or writing the buffer file failed.
    #[error("buffer file {path}: {source}")]
    BufferFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A wait ran out of time (e.g. [`Device::flush`](crate::Device::flush)).
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The device was closed (or its background task ended).
    #[error("the device is closed")]
    Closed,
    /// An HTTP request failed in a way that retrying will not fix (unexpected status).
    #[error("HTTP {status}: {description}")]
    Http {
        /// The status code.
        status: u16,
        /// The API's `error_description`, or the body.
        description: String,
    },
}

impl Error {
    pub(crate) fn config(setting: &'static str, reason: impl Into<String>) -> Error {
        Error::Config {
            setting,
            reason: reason.into(),
        }
    }

    /// Whether the credentials were refused (the device cannot work until they are fixed).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Error::Unauthorized { .. })
    }
}
