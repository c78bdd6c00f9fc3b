//! Admission of new connections: a token bucket in front of the TLS listener, so a hub restarted
//! under thousands of agents takes their handshakes at a bounded rate instead of all at once.
//! Connections over the rate wait in the kernel's accept queue; nothing is refused. The decision
//! (how long to wait) is the pure [`TokenBucket`]; the accept loop is the IO edge.

use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::conn_limits::{Guarded, Limiter};

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

/// Accepts from `listener` at most `rate` per second (bursts of `burst`) until `shutdown`; past the
/// connection caps a connection is closed at once, and every admitted one closes when idle.
pub fn paced(
    listener: TcpListener,
    rate: u32,
    burst: u32,
    limiter: Limiter,
    hub: std::sync::Arc<crate::Hub>,
) -> ReceiverStream<std::io::Result<Guarded>> {
    let (tx, rx) = mpsc::channel(16);
    let shutdown: CancellationToken = hub.shutdown.clone();
    let owner = hub.tasks.clone();
    owner.spawn(async move {
        let metrics = &hub.metrics;
        let mut bucket = TokenBucket::new(rate, burst, Instant::now());
        let mut peak = PeakRate::default();
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
                    metrics.connection_refused("grpc", refusal.label());
                    drop(stream);
                    continue;
                }
            };
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
            if tx.send(Ok(limiter.guard(stream, permit))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
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
