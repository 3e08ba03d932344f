//! The operator's Prometheus metrics: reconciles, errors by kind, reconcile duration, and
//! whether this process holds the leader lease. Label values come from fixed sets, so the
//! series stay bounded however many topologies there are.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Upper bounds (seconds) of the reconcile duration histogram.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus histogram of durations in seconds, lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (bucket, bound) in self.buckets.iter().zip(self.bounds) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Appends the exposition of the histogram `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bucket, bound) in self.buckets.iter().zip(self.bounds) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {}\n{name}_count {count}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
}

/// A reconcile running longer than this is stuck (every request it makes is bounded far
/// below it): `/healthz` fails, and the kubelet restarts the operator.
pub const STUCK: std::time::Duration = std::time::Duration::from_secs(180);

#[derive(Debug)]
pub struct Metrics {
    reconciles: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    duration: Histogram,
    leader: AtomicU64,
    /// The reconciles in flight, by id, with when each started.
    in_flight: Mutex<BTreeMap<u64, Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: AtomicU64::new(0),
            errors: Mutex::default(),
            duration: Histogram::new(&BUCKETS),
            leader: AtomicU64::new(0),
            in_flight: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Counts a reconcile and measures it until the returned guard drops.
    pub fn reconcile(&self) -> ReconcileTimer<'_> {
        let id = self.reconciles.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, start);
        ReconcileTimer {
            metrics: self,
            id,
            start,
        }
    }

    /// `Err(why)` when a reconcile has run for longer than `limit`: the process is alive
    /// but does not get its work done (a request that never returns), which only a
    /// restart mends.
    pub fn live(&self, limit: std::time::Duration) -> Result<(), String> {
        let oldest = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .min()
            .copied();
        match oldest {
            Some(start) if start.elapsed() > limit => Err(format!(
                "stuck: a reconcile has run for {} s (more than {} s)",
                start.elapsed().as_secs(),
                limit.as_secs()
            )),
            _ => Ok(()),
        }
    }

    /// Counts a failed reconcile by what failed.
    pub fn error(&self, kind: &'static str) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *errors.entry(kind).or_default() += 1;
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(u64::from(leader), Ordering::Relaxed);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed) == 1
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP shotover_operator_reconciles_total Reconciles started.\n# TYPE shotover_operator_reconciles_total counter\nshotover_operator_reconciles_total {}",
            self.reconciles.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP shotover_operator_reconcile_errors_total Reconciles that failed, by what failed.\n# TYPE shotover_operator_reconcile_errors_total counter"
        );
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for kind in crate::reconcile::Error::KINDS {
            let n = errors.get(kind).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "shotover_operator_reconcile_errors_total{{kind=\"{kind}\"}} {n}"
            );
        }
        self.duration.render(
            &mut out,
            "shotover_operator_reconcile_duration_seconds",
            "Time spent in one reconcile.",
        );
        let _ = writeln!(
            out,
            "# HELP shotover_operator_leader 1 while this process holds the leader lease and reconciles.\n# TYPE shotover_operator_leader gauge\nshotover_operator_leader {}",
            self.leader.load(Ordering::Relaxed)
        );
        out
    }
}

/// Records the reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    id: u64,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_running_too_long_fails_liveness_until_it_ends() {
        let metrics = Metrics::default();
        assert_eq!(metrics.live(STUCK), Ok(()));
        let timer = metrics.reconcile();
        assert_eq!(metrics.live(STUCK), Ok(()), "running, not for long");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let why = metrics
            .live(std::time::Duration::from_millis(10))
            .expect_err("stuck");
        assert!(
            why.starts_with("stuck: a reconcile has run for 0 s"),
            "{why}"
        );
        drop(timer);
        assert_eq!(metrics.live(std::time::Duration::from_millis(10)), Ok(()));
    }

    #[test]
    fn the_exposition_counts_reconciles_errors_and_durations() {
        let metrics = Metrics::default();
        drop(metrics.reconcile());
        drop(metrics.reconcile());
        metrics.error("apply");
        metrics.set_leader(true);
        let text = metrics.render();
        assert!(
            text.contains("shotover_operator_reconciles_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shotover_operator_reconcile_errors_total{kind=\"apply\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shotover_operator_reconcile_errors_total{kind=\"status\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("shotover_operator_reconcile_duration_seconds_count 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shotover_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("shotover_operator_leader 1\n"), "{text}");
    }
}
