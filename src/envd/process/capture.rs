//! Output capture over pipes: a background process's stdout and stderr pumped into its log, and
//! a foreground run's output collected up to a limit and encoded for the answer.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use base64::Engine;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;

use crate::envd::api::{Encoding, CHUNK_BYTES, RUN_OUTPUT_LIMIT};
use crate::envd::output::{OutputLog, StreamKind};

pub(super) fn receiver(fd: Option<OwnedFd>) -> io::Result<pipe::Receiver> {
    let fd = fd.ok_or_else(|| io::Error::other("child pipe missing"))?;
    pipe::Receiver::from_owned_fd(fd)
}

pub(super) async fn pump_pipe(mut pipe: pipe::Receiver, kind: StreamKind, output: Arc<OutputLog>) {
    let mut buffer = BytesMut::with_capacity(CHUNK_BYTES);
    loop {
        if buffer.capacity() < CHUNK_BYTES / 4 {
            buffer.reserve(CHUNK_BYTES);
        }
        match pipe.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => output.push(kind, buffer.split().freeze()).await,
        }
    }
}

/// Output of a foreground run, capped at [`RUN_OUTPUT_LIMIT`]; the excess is counted.
#[derive(Default)]
pub(super) struct Capture {
    pub(super) data: Vec<u8>,
    pub(super) dropped: u64,
}

impl Capture {
    pub(super) async fn collect(&mut self, mut pipe: impl AsyncRead + Unpin) {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            match pipe.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let room = RUN_OUTPUT_LIMIT.saturating_sub(self.data.len()).min(n);
                    self.data.extend_from_slice(&buffer[..room]);
                    self.dropped += (n - room) as u64;
                }
            }
        }
    }
}

pub(super) fn encode_output(stdout: Vec<u8>, stderr: Vec<u8>) -> (String, String, Encoding) {
    match (String::from_utf8(stdout), String::from_utf8(stderr)) {
        (Ok(out), Ok(err)) => (out, err, Encoding::Utf8),
        (out, err) => {
            let bytes = |r: Result<String, std::string::FromUtf8Error>| match r {
                Ok(s) => s.into_bytes(),
                Err(e) => e.into_bytes(),
            };
            let engine = base64::engine::general_purpose::STANDARD;
            (
                engine.encode(bytes(out)),
                engine.encode(bytes(err)),
                Encoding::Base64,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_for_both_streams_when_either_is_binary() {
        let (out, err, encoding) = encode_output(vec![0xff, 0x00], b"ok".to_vec());
        assert_eq!(encoding, Encoding::Base64);
        assert_eq!(out, "/wA=");
        assert_eq!(err, "b2s=");
        let (out, _, encoding) = encode_output(b"hi".to_vec(), vec![]);
        assert_eq!((out.as_str(), encoding), ("hi", Encoding::Utf8));
    }
}
