//! Serving the API on a TCP listener with the limits that keep it available to ordinary
//! clients while others hold connections open, trickle bytes or never send them.
//!
//! Decisions:
//! - **hyper's HTTP/1 connection is driven here** instead of by `axum::serve`, which offers
//!   none of the limits below. One task per connection, as before.
//! - **Header-read timeout** ([`Limits::header_read_timeout`], hyper's): a request's headers
//!   must be complete this long after the server starts waiting for them, that is after the
//!   connection is accepted or the previous response is sent. It closes connections that send
//!   nothing (idle, also between keep-alive requests) and slowloris connections that send a
//!   header byte now and then.
//! - **Request timeout** ([`Limits::request_timeout`]): the body must be complete this long
//!   after the handler asks for it, else 408. The body is read only after the token is
//!   authenticated and the route authorized (`api::run`), so a caller without a valid token
//!   never gets a body read, however large or slow (401 at once).
//! - **Idle timeout** ([`Limits::idle_timeout`]): a connection on which no byte is read or
//!   written for this long while no handler runs (a client that stopped reading its response)
//!   is closed. A handler that waits (a host's long poll, up to 60 s) does not count as idle.
//! - **Connection cap** ([`Limits::max_connections`]): a connection holds a permit from its
//!   accept until it closes; with none free the server stops accepting, so further clients
//!   wait in the kernel's listen backlog (and get in as the timeouts above free permits)
//!   rather than being refused.
//! - **TLS** (when configured, see [`crate::tls`]): the handshake runs in the connection's
//!   own task, never in the accept loop, and must finish within the header-read timeout, so a
//!   client that opens a connection and never completes a handshake holds a permit no longer
//!   than one that never sends headers.
//! - **Graceful shutdown**: when `shutdown` resolves the listener closes, every connection
//!   finishes its request in flight, and the function returns once all are closed.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
};

/// The limits of the API server (`[api]` in the control plane's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(15),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves (see the module
/// docs).
pub async fn serve(
    router: Router,
    listener: TcpListener,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopped) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // the next accept may work; do not spin meanwhile.
                    tracing::warn!("accepting an API connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (router, stopped) = (router.clone(), stopped.clone());
        match acceptor.clone() {
            None => {
                tokio::spawn(connection(stream, router, limits, stopped, permit));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    // A failed or slow handshake ends the connection; rustls has sent its alert.
                    if let Ok(Ok(tls)) = handshake.await {
                        connection(tls, router, limits, stopped, permit).await;
                    }
                });
            }
        }
    }
    drop(listener);
    stop.send_replace(true);
    // Every connection holds a permit until it closes.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    Ok(())
}

/// When a connection last moved a byte, and how many of its requests are being handled.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// A request being handled (see [`Activity::in_flight`]).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: &Arc<Activity>) -> Busy {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

async fn connection<S: Stream>(
    stream: S,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    stream.nodelay();
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let tower = TowerToHyperService::new(router);
    let a = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let busy = Busy::new(&a);
        let handled = hyper::service::Service::call(&tower, req);
        async move {
            let response = handled.await;
            drop(busy);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let idle_at = activity.last() + limits.idle_timeout;
        tokio::select! {
            // Errors (a header timeout, a reset, a malformed request) end the connection;
            // hyper has answered what deserved an answer.
            _ = conn.as_mut() => return,
            () = tokio::time::sleep_until(idle_at.into()) => {
                let idle = activity.in_flight.load(Ordering::Relaxed) == 0
                    && activity.last().elapsed() >= limits.idle_timeout;
                if idle {
                    // Dropping the connection closes the socket.
                    return;
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// What a connection is served over: TCP, or TLS on TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn nodelay(&self);
}

impl Stream for TcpStream {
    fn nodelay(&self) {
        let _ = self.set_nodelay(true);
    }
}

impl Stream for tokio_rustls::server::TlsStream<TcpStream> {
    // Set on the TCP stream before the handshake.
    fn nodelay(&self) {}
}

/// A stream that records in its [`Activity`] when a byte moved.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: Stream> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: Stream> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
