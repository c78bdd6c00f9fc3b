//! Admission of new connections: a token bucket in front of the TLS listener, so a hub restarted
//! under thousands of agents takes their handshakes at a bounded rate instead of all at once.
//! Connections are accepted at once into a queue no longer than [`Pacing::queue_wait`] worth of
//! handshakes; past that a connection is closed at once, so its agent backs off and comes back,
//! instead of waiting in the kernel's backlog until its own connect timeout gives up — then the
//! hub's handshake for it would be wasted, and under a storm most of them were (goodput fell to a
//! tenth of the rate). Each handshake runs in its own task under a deadline; its outcome — a valid
//! client certificate or none — tells the connection caps who comes first. The decisions (how
//! long to wait, whether to queue) are pure ([`TokenBucket`], [`Queue`]); the loops are the IO edge.

use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::edge::conn_limits::{Guarded, Limiter};

/// A token bucket: `rate` admissions per second on average, up to `burst` at once.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate.max(1)),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token; returns how long to wait before the admission it pays for.
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// What to do with a connection that arrives while `queued` wait for their handshake. Pure.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    /// The most connections that may wait: `queue_wait` worth at the rate (at least a burst).
    pub capacity: usize,
    pub max_wait: Duration,
}

impl Queue {
    pub fn new(pacing: &Pacing) -> Self {
        let worth = (f64::from(pacing.rate.max(1)) * pacing.queue_wait.as_secs_f64()).ceil();
        Self {
            // Bounded by the rate (at most 10^4/s) times a wait of seconds: fits any usize.
            capacity: (worth as usize).max(pacing.burst.max(1) as usize),
            max_wait: pacing.queue_wait,
        }
    }

    /// Whether a connection that waited `waited` for its turn is still worth a handshake (its
    /// agent is likely still waiting for it).
    pub fn fresh(&self, waited: Duration) -> bool {
        waited <= self.max_wait
    }
}

/// Counts admissions per wall-clock second and keeps the busiest second.
#[derive(Debug, Default)]
pub struct PeakRate {
    second: Option<Instant>,
    count: u64,
    pub peak: u64,
}

impl PeakRate {
    pub fn record(&mut self, now: Instant) -> u64 {
        match self.second {
            Some(start) if now.saturating_duration_since(start) < Duration::from_secs(1) => {
                self.count += 1
            }
            _ => {
                self.second = Some(now);
                self.count = 1;
            }
        }
        self.peak = self.peak.max(self.count);
        self.peak
    }
}

/// How the accept loop paces and bounds handshakes.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Handshakes per second on average, up to `burst` at once.
    pub rate: u32,
    pub burst: u32,
    /// A TLS handshake not done within this is dropped.
    pub handshake_deadline: Duration,
    /// The longest a connection waits for its handshake; well under the agents' connect timeout.
    pub queue_wait: Duration,
    /// A connection without a client certificate closes after this much silence.
    pub anonymous_idle: Duration,
}

/// A connection waiting for its handshake.
struct Waiting {
    stream: tokio::net::TcpStream,
    permit: crate::edge::conn_limits::Permit,
    arrived: Instant,
}

/// Accepts from `listener` until `shutdown` and hands at most `rate` connections per second
/// (bursts of `burst`) to their TLS handshake; past the connection caps a connection is closed at
/// once (or the oldest without a client certificate makes room), past the queue too, and every
/// admitted one closes when idle. Yields connections whose TLS handshake finished.
pub fn paced(
    // The listener's name in the refusal metrics.
    lane: &'static str,
    listener: TcpListener,
    pacing: Pacing,
    limiter: Limiter,
    acceptor: tokio_rustls::TlsAcceptor,
    hub: std::sync::Arc<crate::Hub>,
) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<Guarded>>> {
    let (tx, rx) = mpsc::channel(16);
    let queue = Queue::new(&pacing);
    let (queued, mut waiting) = mpsc::channel::<Waiting>(queue.capacity);
    let shutdown: CancellationToken = hub.shutdown.clone();
    // Accepts as fast as connections come, so none waits unseen in the kernel's backlog.
    hub.tasks.spawn({
        let (hub, shutdown, limiter) = (
            std::sync::Arc::clone(&hub),
            shutdown.clone(),
            limiter.clone(),
        );
        async move {
            let metrics = &hub.metrics;
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let permit = match limiter.admit(peer.ip()) {
                    Ok(permit) => permit,
                    Err(refusal) => {
                        metrics.connection_refused(lane, refusal.label());
                        continue;
                    }
                };
                let arrived = Instant::now();
                if let Err(full) = queued.try_send(Waiting {
                    stream,
                    permit,
                    arrived,
                }) {
                    // Closed now, its agent backs off and retries; a handshake it would wait
                    // longer for than its connect timeout would be wasted.
                    drop(full);
                    metrics.connection_refused(lane, "admission_queue_full");
                }
            }
        }
    });
    let owner = hub.tasks.clone();
    owner.spawn(async move {
        let metrics = &hub.metrics;
        let mut bucket = TokenBucket::new(pacing.rate, pacing.burst, Instant::now());
        let mut peak = PeakRate::default();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = waiting.recv() => next,
            };
            let Some(Waiting {
                stream,
                permit,
                arrived,
            }) = next
            else {
                return;
            };
            if !queue.fresh(arrived.elapsed()) {
                metrics.connection_refused(lane, "queued_too_long");
                continue;
            }
            // A peer that gave up while queued has closed already: it gets no token, or a
            // queue of abandoned connections would use up the admission rate.
            if closed_by_peer(&stream) {
                metrics.connection_refused(lane, "closed_while_queued");
                continue;
            }
            let wait = bucket.take(Instant::now());
            if !wait.is_zero() {
                metrics.admissions_delayed.inc();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            metrics.admissions.inc();
            let p = peak.record(Instant::now());
            metrics
                .admissions_peak_per_second
                .set(i64::try_from(p).unwrap_or(i64::MAX));
            let guarded = limiter.guard(stream, permit);
            let (tx, acceptor, hub2) = (tx.clone(), acceptor.clone(), std::sync::Arc::clone(&hub));
            hub.tasks.spawn(async move {
                if let Some(tls) = handshake(&hub2, acceptor, guarded, pacing).await {
                    // The server is gone at shutdown: the connection just closes.
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Whether the peer already closed its side (EOF waiting to be read) or the socket failed; a
/// peer that has sent nothing yet, or its ClientHello, is still there.
fn closed_by_peer(stream: &tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match stream.poll_peek(&mut cx, &mut tokio::io::ReadBuf::new(&mut byte)) {
        std::task::Poll::Ready(Ok(0)) | std::task::Poll::Ready(Err(_)) => true,
        std::task::Poll::Ready(Ok(_)) | std::task::Poll::Pending => false,
    }
}

/// Runs one TLS handshake under its deadline and tells the caps what the peer is: with a valid,
/// unrevoked client certificate it is never closed for another; without one it is anonymous
/// (short idle). `None`: the connection is closed (the reason counted).
async fn handshake(
    hub: &crate::Hub,
    acceptor: tokio_rustls::TlsAcceptor,
    guarded: Guarded,
    pacing: Pacing,
) -> Option<tokio_rustls::server::TlsStream<Guarded>> {
    let mut tls =
        match tokio::time::timeout(pacing.handshake_deadline, acceptor.accept(guarded)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                hub.metrics.connection_refused("grpc", "handshake_failed");
                return None;
            }
            // The deadline passed (the error says only that): counted, the connection dropped.
            Err(_) => {
                hub.metrics.connection_refused("grpc", "handshake_timeout");
                return None;
            }
        };
    let (io, session) = tls.get_mut();
    let peer = session
        .peer_certificates()
        .and_then(|c| c.first())
        // A certificate rustls verified but the hub cannot read as an identity only loses its
        // priority here; every RPC on the connection is refused by `auth`, naming why.
        .and_then(|leaf| hub.ca.peer_cert(leaf).ok())
        .filter(|p| !hub.auth.is_revoked(&p.serial));
    match peer {
        Some(p) => {
            let admin = matches!(p.identity, crate::identity::pki::Identity::Admin(_));
            if !io.permit().authenticated(admin) {
                hub.metrics.connection_refused("grpc", "max_connections");
                return None;
            }
        }
        None => io.set_idle(pacing.anonymous_idle),
    }
    Some(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_paces_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        let waits: Vec<_> = (0..5).map(|_| b.take(t0)).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        assert_eq!(waits[3], Duration::from_millis(100));
        assert_eq!(waits[4], Duration::from_millis(200));
        // After a quiet second the burst is back (but not more than the burst).
        let t1 = t0 + Duration::from_secs(10);
        let waits: Vec<_> = (0..4).map(|_| b.take(t1)).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        assert!(waits[3] > Duration::ZERO);
    }

    #[test]
    fn the_queue_holds_what_the_rate_clears_within_its_wait() {
        let pacing = |rate, burst, wait_ms| Pacing {
            rate,
            burst,
            handshake_deadline: Duration::from_secs(10),
            queue_wait: Duration::from_millis(wait_ms),
            anonymous_idle: Duration::from_secs(10),
        };
        for (rate, burst, wait_ms, capacity) in
            [(200, 50, 2_000, 400), (10, 50, 2_000, 50), (1, 1, 500, 1)]
        {
            let q = Queue::new(&pacing(rate, burst, wait_ms));
            assert_eq!(
                q.capacity, capacity,
                "rate {rate} burst {burst} wait {wait_ms} ms"
            );
        }
        let q = Queue::new(&pacing(200, 50, 2_000));
        assert!(q.fresh(Duration::from_millis(1_999)));
        assert!(!q.fresh(Duration::from_millis(2_001)));
    }

    #[test]
    fn peak_rate_counts_the_busiest_second() {
        let t0 = Instant::now();
        let mut p = PeakRate::default();
        for i in 0..5 {
            p.record(t0 + Duration::from_millis(i * 100));
        }
        for i in 0..3 {
            p.record(t0 + Duration::from_millis(1500 + i));
        }
        assert_eq!(p.peak, 5);
    }
}
