//! The `zlib-stream` transport compression.
//!
//! With `compress=zlib-stream` the gateway keeps one zlib context for the whole connection and
//! flushes it after each payload (a sync flush), so every payload ends with the four bytes
//! `00 00 ff ff`. A payload may span several WebSocket binary messages; the receiver buffers until
//! it sees the suffix, then inflates with the same context it used for the previous payloads.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The bytes that end every payload of a `zlib-stream` connection.
pub const ZLIB_SUFFIX: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// An error while inflating a `zlib-stream` payload. The connection cannot continue after one,
/// because the shared context is lost: reconnect.
#[derive(Debug, thiserror::Error)]
pub enum InflateError {
    /// The compressed data is corrupt.
    #[error("invalid zlib-stream data after {total_in} compressed bytes")]
    Corrupt {
        total_in: u64,
        #[source]
        source: flate2::DecompressError,
    },
    /// A payload grew past the configured limit before it ended.
    #[error("zlib-stream payload exceeds {limit} bytes")]
    TooLarge { limit: usize },
}

/// The receiving side: one inflate context per connection.
pub struct Inflater {
    context: Decompress,
    pending: Vec<u8>,
    output: Vec<u8>,
    max_payload: usize,
}

impl Inflater {
    /// Creates the context for a new connection. `max_payload` bounds both the compressed bytes
    /// buffered for one payload and its inflated size.
    pub fn new(max_payload: usize) -> Self {
        Self {
            context: Decompress::new(true),
            pending: Vec::new(),
            output: Vec::new(),
            max_payload,
        }
    }

    /// Takes one binary WebSocket message. Returns the inflated payload once a message ends with
    /// [`ZLIB_SUFFIX`], and `None` while the payload is incomplete.
    ///
    /// # Errors
    ///
    /// Returns an error on corrupt data or a payload over the limit. The context is then unusable.
    pub fn push(&mut self, message: &[u8]) -> Result<Option<Vec<u8>>, InflateError> {
        self.pending.extend_from_slice(message);
        if self.pending.len() > self.max_payload {
            return Err(InflateError::TooLarge {
                limit: self.max_payload,
            });
        }
        if !self.pending.ends_with(&ZLIB_SUFFIX) {
            return Ok(None);
        }

        self.output.clear();
        let mut consumed = 0;
        loop {
            if self.output.capacity() - self.output.len() < 4096 {
                self.output.reserve(self.pending.len().max(4096) * 2);
            }
            let before = self.context.total_in();
            let status = self
                .context
                .decompress_vec(
                    &self.pending[consumed..],
                    &mut self.output,
                    FlushDecompress::Sync,
                )
                .map_err(|source| InflateError::Corrupt {
                    total_in: self.context.total_in(),
                    source,
                })?;
            consumed += (self.context.total_in() - before) as usize;
            if self.output.len() > self.max_payload {
                return Err(InflateError::TooLarge {
                    limit: self.max_payload,
                });
            }
            // Inflate stops before the end of the input or of its pending output only when the
            // output buffer is full; with room left over, the payload is complete.
            let output_full = self.output.len() == self.output.capacity();
            if matches!(status, Status::StreamEnd)
                || (consumed == self.pending.len() && !output_full)
            {
                break;
            }
        }

        self.pending.clear();
        Ok(Some(std::mem::take(&mut self.output)))
    }
}

/// The sending side: one deflate context per connection, sync-flushed after each payload.
pub struct Deflater {
    context: Compress,
}

impl Deflater {
    /// Creates the context for a new connection.
    pub fn new() -> Self {
        Self {
            context: Compress::new(Compression::fast(), true),
        }
    }

    /// Compresses one payload. The result ends with [`ZLIB_SUFFIX`].
    pub fn compress(&mut self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let before = self.context.total_in();
            self.context
                .compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
                .expect("deflate into a growing buffer cannot fail");
            consumed += (self.context.total_in() - before) as usize;
            // A completed sync flush ends with the empty stored block `00 00 ff ff`; until it
            // appears, the compressor still holds output back for lack of buffer space.
            if consumed == payload.len() && out.ends_with(&ZLIB_SUFFIX) {
                break;
            }
        }
        out
    }
}

impl Default for Deflater {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zlib_stream_round_trips_many_payloads() {
        let mut deflater = Deflater::new();
        let mut inflater = Inflater::new(1 << 24);
        for i in 0..200 {
            let payload = format!("{{\"op\":0,\"s\":{i},\"d\":{}}}", "\"x\"".repeat(i * 37));
            let compressed = deflater.compress(payload.as_bytes());
            assert!(compressed.ends_with(&ZLIB_SUFFIX));
            let out = inflater.push(&compressed).unwrap().unwrap();
            assert_eq!(out.len(), payload.len(), "payload {i}");
            assert!(out == payload.as_bytes(), "payload {i} differs");
        }
    }

    #[test]
    fn inflater_waits_for_suffix_across_messages() {
        let mut deflater = Deflater::new();
        let mut inflater = Inflater::new(1 << 20);
        let payload = "{\"op\":10,\"d\":{\"heartbeat_interval\":41250}}".repeat(50);
        let compressed = deflater.compress(payload.as_bytes());
        let (head, tail) = compressed.split_at(compressed.len() / 2);
        assert_eq!(inflater.push(head).unwrap(), None);
        assert_eq!(inflater.push(tail).unwrap().unwrap(), payload.as_bytes());
    }

    #[test]
    fn inflater_context_spans_payloads() {
        // The second payload refers back to the first one's window: a fresh context per payload
        // cannot inflate it.
        let mut deflater = Deflater::new();
        let first = deflater.compress(b"the same words again and again and again");
        let second = deflater.compress(b"the same words again and again and again");
        let mut shared = Inflater::new(1 << 20);
        shared.push(&first).unwrap();
        assert!(shared.push(&second).unwrap().is_some());
        let mut fresh = Inflater::new(1 << 20);
        assert!(fresh.push(&second).is_err());
    }

    #[test]
    fn inflater_rejects_oversized_payload() {
        let mut deflater = Deflater::new();
        let mut inflater = Inflater::new(1024);
        let compressed = deflater.compress(&vec![b'a'; 10_000]);
        assert!(matches!(
            inflater.push(&compressed),
            Err(InflateError::TooLarge { limit: 1024 })
        ));
    }
}
