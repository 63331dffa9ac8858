//! Streaming SHA-256 and length of an image, fed in pieces as it arrives.

use std::io::Read;

use sha2::{Digest, Sha256};

/// The size and SHA-256 of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageDigest {
    /// Length in bytes.
    pub size: u64,
    /// SHA-256.
    pub sha256: [u8; 32],
}

impl ImageDigest {
    /// The digest as 64 lowercase hex digits (the firmware id).
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// Hashes everything `reader` yields (in 64 KiB pieces, never the whole image at once).
    pub fn of_reader(mut reader: impl Read) -> std::io::Result<ImageDigest> {
        let mut hasher = ImageHasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(hasher.finish()),
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The digest of bytes in memory.
    pub fn of_bytes(bytes: &[u8]) -> ImageDigest {
        let mut hasher = ImageHasher::new();
        hasher.update(bytes);
        hasher.finish()
    }
}

/// SHA-256 and byte count of an image fed piece by piece (as it is downloaded or uploaded).
#[derive(Debug, Clone, Default)]
pub struct ImageHasher {
    sha: Sha256,
    size: u64,
}

impl ImageHasher {
    /// A hasher that has seen nothing.
    pub fn new() -> ImageHasher {
        ImageHasher::default()
    }

    /// Feeds the next piece.
    pub fn update(&mut self, piece: &[u8]) {
        self.sha.update(piece);
        self.size += piece.len() as u64;
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of everything fed.
    pub fn finish(self) -> ImageDigest {
        ImageDigest {
            size: self.size,
            sha256: self.sha.finalize().into(),
        }
    }
}
