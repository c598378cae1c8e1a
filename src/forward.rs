//! What the two hops of the port proxy (control plane → agent → guest) share: which headers are
//! the connection's own and never forwarded, and exchanges that end after a time without traffic
//! in either direction, so a quiet or hostile guest service (or a client that stopped reading)
//! cannot hold them forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Headers that describe one hop's connection (RFC 9110 §7.6.1), not the message: a proxy drops
/// them, and whatever the `Connection` header names, before forwarding. An upgrade keeps
/// `Connection: upgrade` and `Upgrade`, which the forwarded request needs to ask for it too.
pub fn remove_hop_headers(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    // A message framed both ways is framed by `Transfer-Encoding`; the next hop frames it
    // anew, so a `Content-Length` beside it would mislead that hop into cutting it short.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if keep_upgrade {
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Whether a request asks to switch protocols (a WebSocket, say).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// When a proxied exchange last moved a byte, either way: one clock for both of its
/// connections, so a WebSocket quiet one way but busy the other is in use, and a connection that
/// stopped being read (its client stalled, or half-closed and went silent) is idle however much
/// the other side still has to say.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    last_ms: AtomicU64,
    idle: Duration,
}

impl Activity {
    pub fn new(idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            idle,
        })
    }

    fn touch(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// Completes once `idle` has passed without a byte either way.
    pub async fn idled(self: Arc<Self>) {
        loop {
            let last = self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + self.idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// `work`'s outcome, or `None` if the exchange went idle first (`work` is dropped, which
    /// closes whatever connections it owns). Takes its own handle, so the future borrows
    /// nothing and may run in a task of its own.
    pub async fn unless_idle<F: Future>(self: Arc<Self>, work: F) -> Option<F::Output> {
        let idled = self.idled();
        tokio::select! {
            outcome = work => Some(outcome),
            () = idled => None,
        }
    }

    /// Whether the exchange has passed its idle time without a byte.
    pub fn is_idle(&self) -> bool {
        let last = self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Instant::now() >= last + self.idle
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle
    }
}

/// A connection whose every byte read or written counts on its exchange's [`Activity`].
pub struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
    read: u64,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            read: 0,
        }
    }

    /// The bytes read from this connection so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let outcome = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity.touch();
            self.read += read as u64;
        }
        outcome
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(outcome, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        outcome
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Carries bytes both ways between two upgraded connections until both ends close or the
/// exchange passes `activity`'s idle time without a byte; returns the bytes read from `a` and
/// from `b`, however it ended.
pub async fn splice<A, B>(a: A, b: B, activity: Arc<Activity>) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = Tracked::new(a, activity.clone());
    let mut b = Tracked::new(b, activity.clone());
    let _ = activity
        .unless_idle(tokio::io::copy_bidirectional(&mut a, &mut b))
        .await;
    (a.bytes_read(), b.bytes_read())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn hop_headers_go_and_the_ones_connection_names_with_them() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        let mut upgrade = headers.clone();
        remove_hop_headers(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::CONTENT_TYPE));
        remove_hop_headers(&mut upgrade, true);
        assert_eq!(upgrade[header::CONNECTION], "upgrade");
        assert_eq!(upgrade[header::UPGRADE], "websocket");
        assert!(!upgrade.contains_key("x-secret"));
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(!wants_upgrade(&headers));
        headers.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        assert!(wants_upgrade(&headers));
    }

    #[tokio::test]
    async fn traffic_either_way_keeps_an_exchange_and_silence_ends_it() {
        let activity = Activity::new(Duration::from_millis(300));
        let (near, mut far) = tokio::io::duplex(64);
        let mut near = Tracked::new(near, activity.clone());
        let mut byte = [0u8; 1];
        let started = Instant::now();
        let outcome = activity
            .clone()
            .unless_idle(async {
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    near.write_all(b"x").await.unwrap();
                    far.read_exact(&mut byte).await.unwrap();
                }
            })
            .await;
        assert!(outcome.is_some(), "busy for {:?}", started.elapsed());
        // Nothing moves any more, one way or the other.
        let silent = activity
            .clone()
            .unless_idle(near.read_exact(&mut byte))
            .await;
        assert!(silent.is_none());
    }

    #[tokio::test]
    async fn a_splice_ends_when_its_client_goes_silent_after_the_service_closed() {
        let activity = Activity::new(Duration::from_millis(300));
        let (client, client_far) = tokio::io::duplex(64);
        let (service, mut service_far) = tokio::io::duplex(64);
        let splice = tokio::spawn(splice(client_far, service, activity));
        service_far.shutdown().await.unwrap();
        // The client keeps its end open and says nothing.
        tokio::time::timeout(Duration::from_secs(5), splice)
            .await
            .expect("the splice ended at its idle time")
            .unwrap();
        drop(client);
    }
}
