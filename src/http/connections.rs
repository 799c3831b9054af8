//! A bound on the connections the HTTP server holds open. The publish gate
//! ([`super::shed`]) bounds the work on publishes, but every connection costs memory of its
//! own (hyper's read and write buffers, the task), and a client that opens a connection per
//! request it is waiting on (an open-loop load generator, a retry storm) can open thousands:
//! the overload bench grew the service to 672 MiB that way with the gate on. Past
//! `--max-connections`, a new connection is answered at once with the same JSON
//! `503 broker_unavailable` and `Retry-After` as a shed publish, and closed, instead of being
//! left in the kernel's accept queue, where the client would see a connect timeout and retry
//! after 1, 3, 7 s.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use crate::telemetry;

/// Refusals written at once at most; beyond, a connection over the limit is just closed.
const MOST_REFUSING: usize = 256;
/// What a refusal reads of the request before it closes, so that the kernel closes with a
/// FIN rather than a reset (which could destroy the answer before the client reads it).
const REFUSAL_READ_BYTES: usize = 64 * 1024;
/// How long a refusal waits for the request to be read and the answer to leave.
const REFUSAL_TIME: Duration = Duration::from_millis(200);

/// A listener that holds at most `limit` connections open.
pub struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    refusal: Arc<[u8]>,
}

impl LimitedListener {
    /// Wraps `inner`, keeping at most `limit` (at least one) connections open.
    pub fn new(inner: TcpListener, limit: usize) -> Self {
        let limit = limit.max(1);
        let body = serde_json::json!({"error": {
            "code": "broker_unavailable",
            "message": format!("the service is at its limit of {limit} open connections; nothing was read or written, retry later"),
            "details": [],
        }})
        .to_string();
        let refusal = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 2\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        LimitedListener {
            inner,
            slots: Arc::new(Semaphore::new(limit)),
            refusing: Arc::new(Semaphore::new(MOST_REFUSING)),
            refusal: refusal.into_bytes().into(),
        }
    }

    /// Answers a connection over the limit and closes it, in the background.
    fn refuse(&self, mut stream: TcpStream) {
        metrics::counter!(telemetry::HTTP_CONNECTIONS_REFUSED).increment(1);
        let Ok(permit) = self.refusing.clone().try_acquire_owned() else {
            return;
        };
        let refusal = self.refusal.clone();
        tokio::spawn(async move {
            let answer = async {
                stream.write_all(&refusal).await?;
                stream.shutdown().await?;
                // Read what the client sent (bounded) so that closing is a FIN.
                let mut buf = vec![0; 8192];
                let mut read = 0;
                while read < REFUSAL_READ_BYTES {
                    match stream.read(&mut buf).await? {
                        0 => break,
                        n => read += n,
                    }
                }
                io::Result::Ok(())
            };
            let _ = tokio::time::timeout(REFUSAL_TIME, answer).await;
            drop(permit);
        });
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            // Answers are small and written whole: Nagle's algorithm would hold the next
            // one back until the peer acknowledged the last (up to its delayed-ACK 40 ms).
            let _ = stream.set_nodelay(true);
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    return (
                        Counted {
                            stream,
                            _slot: slot,
                        },
                        addr,
                    );
                }
                Err(_) => self.refuse(stream),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection holding one of the listener's slots until it is closed.
pub struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
