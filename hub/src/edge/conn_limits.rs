//! Every accepted connection is owned and bounded: capped in number overall and per source
//! address, and closed when it goes quiet (a TLS session that never sends the HTTP/2 preface, a
//! webhook whose body stalls) or, on the HTTP listener, when it outlives its maximum age. Healthy
//! connections are never idle that long: the gRPC server pings every 20 s and peers answer.
//! On the gRPC listener peers that presented a valid client certificate come first: at the cap
//! the oldest connection without one is closed to make room, and a few slots past the cap are
//! kept for operators, so anonymous connections can never lock out an admin or a known agent.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The caps of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub max_total: usize,
    pub max_per_address: usize,
    /// No byte from the peer for this long closes the connection.
    pub idle: Duration,
    /// The connection is closed this long after it was accepted, busy or not.
    pub max_age: Option<Duration>,
    /// Authenticated peers first (the gRPC listener): at the cap, the oldest connection not
    /// (yet) authenticated is closed for a new one, and [`ADMIN_RESERVE`] slots past the cap
    /// admit connections only an admin may keep.
    pub authenticated_first: bool,
}

/// Slots past `max_total` a connection may take while its handshake tells whether it is an admin;
/// only an admin keeps one.
pub const ADMIN_RESERVE: usize = 8;

/// Why a connection was refused or closed (a metric label: a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerAddress,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerAddress => "max_per_address",
        }
    }
}

/// Live connections by source address, and those not authenticated (oldest first), each with
/// the token that closes it.
#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    next: u64,
    unauthenticated: std::collections::BTreeMap<u64, tokio_util::sync::CancellationToken>,
}

/// Counts connections closed by a timer, by reason.
pub type Closed = prometheus_client::metrics::family::Family<
    crate::edge::metrics::RefusalLabels,
    prometheus_client::metrics::counter::Counter,
>;

/// The admission side: counts live connections and refuses past the caps.
#[derive(Clone)]
pub struct Limiter {
    caps: Caps,
    counts: Arc<Mutex<Counts>>,
    listener: &'static str,
    closed: Closed,
}

impl Limiter {
    /// Caps for the listener named `listener` ("grpc", "http"); timer closes are counted in `closed`.
    pub fn new(caps: Caps, listener: &'static str, closed: Closed) -> Self {
        Self {
            caps,
            counts: Arc::default(),
            listener,
            closed,
        }
    }

    fn count_close(&self, reason: &'static str) {
        self.closed
            .get_or_create(&crate::edge::metrics::RefusalLabels {
                listener: self.listener.into(),
                reason: reason.into(),
            })
            .inc();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Counter updates only: a poisoned lock still holds sound counts.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `peer`, or says which cap it hit. A new connection is not
    /// authenticated until [`Permit::authenticated`] says so.
    pub fn admit(&self, peer: IpAddr) -> Result<Permit, Refusal> {
        let mut counts = self.lock();
        if counts.by_address.get(&peer).copied().unwrap_or(0) >= self.caps.max_per_address {
            return Err(Refusal::PerAddress);
        }
        if counts.total >= self.caps.max_total {
            let oldest = counts.unauthenticated.keys().next().copied();
            match oldest {
                Some(seq) if self.caps.authenticated_first => {
                    if let Some(token) = counts.unauthenticated.remove(&seq) {
                        token.cancel();
                    }
                    drop(counts);
                    self.count_close("evicted_unauthenticated");
                    counts = self.lock();
                }
                _ if self.caps.authenticated_first
                    && counts.total < self.caps.max_total + ADMIN_RESERVE => {}
                _ => return Err(Refusal::Total),
            }
        }
        *counts.by_address.entry(peer).or_insert(0) += 1;
        counts.total += 1;
        counts.next += 1;
        let seq = counts.next;
        let evict = tokio_util::sync::CancellationToken::new();
        counts.unauthenticated.insert(seq, evict.clone());
        Ok(Permit {
            limiter: self.clone(),
            peer,
            seq,
            evict,
        })
    }

    /// Live connections now.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.lock().total
    }

    /// Wraps an admitted stream so it closes when idle or too old.
    pub fn guard(&self, stream: TcpStream, permit: Permit) -> Guarded {
        let now = Instant::now();
        let evicted = Box::pin(permit.evict.clone().cancelled_owned());
        Guarded {
            inner: stream,
            evicted,
            permit,
            idle: self.caps.idle,
            idle_timer: Box::pin(tokio::time::sleep_until(now + self.caps.idle)),
            age_timer: self
                .caps
                .max_age
                .map(|age| Box::pin(tokio::time::sleep_until(now + age))),
        }
    }
}

/// A slot in the caps, released when the connection is dropped.
pub struct Permit {
    limiter: Limiter,
    peer: IpAddr,
    seq: u64,
    /// Cancelled to close the connection for an authenticated one.
    evict: tokio_util::sync::CancellationToken,
}

impl Permit {
    /// The peer presented a valid client certificate: its connection is never closed for
    /// another. Returns `false` when the connection took one of the slots past the cap and is
    /// not an admin's: the caller closes it.
    pub fn authenticated(&self, admin: bool) -> bool {
        let mut counts = self.limiter.lock();
        counts.unauthenticated.remove(&self.seq);
        admin || counts.total <= self.limiter.caps.max_total
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.limiter.lock();
        counts.unauthenticated.remove(&self.seq);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_address.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.by_address.remove(&self.peer);
            }
        }
    }
}

/// A TCP stream that fails its reads once the peer has been silent for `idle` (or the connection
/// is older than its maximum age), so the server above it drops the connection.
pub struct Guarded {
    inner: TcpStream,
    permit: Permit,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    age_timer: Option<Pin<Box<Sleep>>>,
    evicted: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Guarded {
    pub fn permit(&self) -> &Permit {
        &self.permit
    }

    /// Closes the connection after `idle` of silence from now on (shorter for anonymous peers).
    pub fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
        self.idle_timer.as_mut().reset(Instant::now() + idle);
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.evicted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed for an authenticated peer at the connection cap",
            )));
        }
        if let Some(age) = self.age_timer.as_mut()
            && age.as_mut().poll(cx).is_ready()
        {
            self.permit.limiter.count_close("max_age");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection reached its maximum age",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.idle_timer.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.idle_timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.permit.limiter.count_close("idle");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "peer idle for too long",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The HTTP listener (webhooks, metrics) with the same caps.
pub struct GuardedListener {
    pub listener: tokio::net::TcpListener,
    pub limiter: Limiter,
    pub hub: Arc<crate::Hub>,
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting an http connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match self.limiter.admit(addr.ip()) {
                Ok(permit) => return (self.limiter.guard(stream, permit), addr),
                Err(refusal) => {
                    self.hub.metrics.connection_refused("http", refusal.label());
                    drop(stream);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_address_and_release_on_drop() {
        let l = Limiter::new(
            Caps {
                max_total: 3,
                max_per_address: 2,
                idle: Duration::from_secs(1),
                max_age: None,
                authenticated_first: false,
            },
            "test",
            Closed::default(),
        );
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = l.admit(a).unwrap();
        let _p2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refusal::PerAddress));
        let _p3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(Refusal::Total));
        drop(p1);
        assert_eq!(l.live(), 2);
        assert!(l.admit(a).is_ok());
    }

    #[tokio::test]
    async fn a_silent_peer_is_cut_off_after_the_idle_time() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Closed::default();
        let l = Limiter::new(
            Caps {
                max_total: 10,
                max_per_address: 10,
                idle: Duration::from_millis(200),
                max_age: None,
                authenticated_first: false,
            },
            "test",
            closed.clone(),
        );
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let mut guarded = l.guard(stream, l.admit(peer.ip()).unwrap());
        let mut buf = [0u8; 8];
        let started = std::time::Instant::now();
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(190));
        drop(guarded);
        assert_eq!(l.live(), 0);
        let idle = crate::edge::metrics::RefusalLabels {
            listener: "test".into(),
            reason: "idle".into(),
        };
        assert_eq!(closed.get_or_create(&idle).get(), 1);
    }

    #[test]
    fn at_the_cap_the_oldest_unauthenticated_goes_and_admins_have_a_reserve() {
        let l = Limiter::new(
            Caps {
                max_total: 3,
                max_per_address: 100,
                idle: Duration::from_secs(1),
                max_age: None,
                authenticated_first: true,
            },
            "test",
            Closed::default(),
        );
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let agent = l.admit(a).unwrap();
        assert!(agent.authenticated(false));
        let anon1 = l.admit(a).unwrap();
        let anon2 = l.admit(a).unwrap();
        // At the cap: the oldest anonymous connection is closed for the new one.
        let newcomer = l.admit(a).unwrap();
        assert!(anon1.evict.is_cancelled());
        assert!(!anon2.evict.is_cancelled() && !agent.evict.is_cancelled());
        drop(anon1);
        // Only authenticated connections left at the cap: the reserve admits, only an admin keeps.
        assert!(newcomer.authenticated(false));
        assert!(anon2.authenticated(true));
        let over: Vec<Permit> = (0..ADMIN_RESERVE).map(|_| l.admit(a).unwrap()).collect();
        assert!(
            !over[0].authenticated(false),
            "an agent past the cap is closed"
        );
        for p in &over[1..] {
            assert!(p.authenticated(true), "an admin keeps its slot");
        }
        assert_eq!(
            l.admit(a).err(),
            Some(Refusal::Total),
            "cap and reserve full of authenticated peers"
        );
        drop(over);
        assert!(l.admit(a).is_ok());
    }
}
