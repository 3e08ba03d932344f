//! The webhook's Prometheus metrics. Every label value comes from a fixed set, so the series
//! stay bounded.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use shotover_operator::metrics::Histogram;

use crate::inject::{Refuse, Skip};

/// Upper bounds (seconds) of the admission duration histogram.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// What became of one admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(Skip),
    Refused(Refuse),
    /// Not decided: the apiserver could not be read (answered HTTP 500, so the webhook's
    /// `failurePolicy` applies).
    ApiserverError,
}

#[derive(Debug)]
pub struct Metrics {
    injected: AtomicU64,
    skipped: [AtomicU64; Skip::ALL.len()],
    refused: [AtomicU64; Refuse::ALL.len()],
    apiserver_errors: AtomicU64,
    dry_run: AtomicU64,
    duration: Histogram,
    cert_not_after: AtomicI64,
    cert_renewals: AtomicU64,
    cert_reloads: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            injected: AtomicU64::new(0),
            skipped: Default::default(),
            refused: Default::default(),
            apiserver_errors: AtomicU64::new(0),
            dry_run: AtomicU64::new(0),
            duration: Histogram::new(&BUCKETS),
            cert_not_after: AtomicI64::new(0),
            cert_renewals: AtomicU64::new(0),
            cert_reloads: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts a decided request (dry-run requests only count as dry-run).
    pub fn admission(&self, outcome: Outcome, dry_run: bool, seconds: f64) {
        if dry_run {
            self.dry_run.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match outcome {
            Outcome::Injected => &self.injected,
            Outcome::Skipped(skip) => {
                &self.skipped[Skip::ALL.iter().position(|s| *s == skip).unwrap_or(0)]
            }
            Outcome::Refused(refuse) => {
                &self.refused[Refuse::ALL.iter().position(|r| *r == refuse).unwrap_or(0)]
            }
            Outcome::ApiserverError => &self.apiserver_errors,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.duration.observe(seconds);
    }

    pub fn set_certificate_expiry(&self, unix_seconds: i64) {
        self.cert_not_after.store(unix_seconds, Ordering::Relaxed);
    }

    pub fn certificate_renewed(&self) {
        self.cert_renewals.fetch_add(1, Ordering::Relaxed);
    }

    pub fn certificate_reloaded(&self) {
        self.cert_reloads.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP shotover_webhook_admissions_total Pod admission requests by result and reason (dry-run requests excluded).\n# TYPE shotover_webhook_admissions_total counter"
        );
        let _ = writeln!(
            out,
            "shotover_webhook_admissions_total{{result=\"injected\",reason=\"injected\"}} {}",
            self.injected.load(Ordering::Relaxed)
        );
        for (skip, n) in Skip::ALL.iter().zip(&self.skipped) {
            let _ = writeln!(
                out,
                "shotover_webhook_admissions_total{{result=\"skipped\",reason=\"{}\"}} {}",
                skip.as_str(),
                n.load(Ordering::Relaxed)
            );
        }
        for (refuse, n) in Refuse::ALL.iter().zip(&self.refused) {
            let _ = writeln!(
                out,
                "shotover_webhook_admissions_total{{result=\"refused\",reason=\"{}\"}} {}",
                refuse.as_str(),
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "shotover_webhook_admissions_total{{result=\"error\",reason=\"apiserver-unavailable\"}} {}",
            self.apiserver_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP shotover_webhook_dry_run_requests_total Dry-run admission requests (answered alike, without Events).\n# TYPE shotover_webhook_dry_run_requests_total counter\nshotover_webhook_dry_run_requests_total {}",
            self.dry_run.load(Ordering::Relaxed)
        );
        self.duration.render(
            &mut out,
            "shotover_webhook_admission_duration_seconds",
            "Time from reading an admission request to answering it.",
        );
        let _ = writeln!(
            out,
            "# HELP shotover_webhook_certificate_expiry_timestamp_seconds When the serving certificate expires (Unix time; 0 with --cert-mode files).\n# TYPE shotover_webhook_certificate_expiry_timestamp_seconds gauge\nshotover_webhook_certificate_expiry_timestamp_seconds {}",
            self.cert_not_after.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP shotover_webhook_certificate_renewals_total Serving certificates this process issued to replace one due for renewal.\n# TYPE shotover_webhook_certificate_renewals_total counter\nshotover_webhook_certificate_renewals_total {}",
            self.cert_renewals.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP shotover_webhook_certificate_reloads_total Times a new serving certificate was swapped in without a restart.\n# TYPE shotover_webhook_certificate_reloads_total counter\nshotover_webhook_certificate_reloads_total {}",
            self.cert_reloads.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_by_reason_and_dry_runs_apart() {
        let m = Metrics::default();
        m.admission(Outcome::Injected, false, 0.001);
        m.admission(Outcome::Skipped(Skip::HostNetwork), false, 0.001);
        m.admission(Outcome::Refused(Refuse::TopologyNotFound), false, 0.002);
        m.admission(Outcome::Injected, true, 0.001);
        m.admission(Outcome::ApiserverError, false, 0.001);
        m.certificate_reloaded();
        let text = m.render();
        for line in [
            "shotover_webhook_admissions_total{result=\"injected\",reason=\"injected\"} 1\n",
            "shotover_webhook_admissions_total{result=\"skipped\",reason=\"host-network\"} 1\n",
            "shotover_webhook_admissions_total{result=\"skipped\",reason=\"not-opted-in\"} 0\n",
            "shotover_webhook_admissions_total{result=\"refused\",reason=\"topology-not-found\"} 1\n",
            "shotover_webhook_admissions_total{result=\"error\",reason=\"apiserver-unavailable\"} 1\n",
            "shotover_webhook_dry_run_requests_total 1\n",
            "shotover_webhook_admission_duration_seconds_count 4\n",
            "shotover_webhook_admission_duration_seconds_bucket{le=\"0.001\"} 3\n",
            "shotover_webhook_certificate_reloads_total 1\n",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
