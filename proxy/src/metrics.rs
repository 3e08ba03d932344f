//! A small Prometheus registry: counters, gauges and fixed-bucket histograms.
//!
//! Every series is registered once (when a source starts or a connection builds its chain)
//! and then updated through an `Arc` of atomics, so the hot path takes no lock and memory
//! does not grow with traffic, whether or not anybody scrapes `/metrics`. Label values come
//! from the configuration, except where a caller bounds them itself (QueryCounter).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Adds `n` (maybe negative); returns the new value.
    pub fn add(&self, n: i64) -> i64 {
        self.0.fetch_add(n, Ordering::Relaxed) + n
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket bounds for latencies, in nanoseconds (5 µs to 10 s).
pub const LATENCY_BUCKETS_NS: &[u64] = &[
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Bucket bounds for batch sizes, in messages.
pub const BATCH_BUCKETS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [u64],
    /// Multiplier from the observed unit to the rendered one (1e-9 for ns -> s).
    scale: f64,
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramInner>);

impl Histogram {
    pub fn observe(&self, value: u64) {
        let h = &self.0;
        let i = h
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(h.bounds.len());
        h.buckets[i].fetch_add(1, Ordering::Relaxed);
        h.sum.fetch_add(value, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
enum Series {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

#[derive(Debug)]
struct Family {
    help: &'static str,
    series: BTreeMap<String, Series>,
}

/// The process-wide registry behind `/metrics`.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

static GLOBAL: LazyLock<Registry> = LazyLock::new(Registry::default);

pub fn global() -> &'static Registry {
    &GLOBAL
}

/// A counter in the global registry.
pub fn counter(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Counter {
    global().counter(name, help, labels)
}

/// A gauge in the global registry.
pub fn gauge(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Gauge {
    global().gauge(name, help, labels)
}

/// A latency histogram (observed in ns, rendered in seconds) in the global registry.
pub fn latency(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Histogram {
    global().histogram(name, help, labels, LATENCY_BUCKETS_NS, 1e-9)
}

/// A batch-size histogram in the global registry.
pub fn batch_size(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Histogram {
    global().histogram(name, help, labels, BATCH_BUCKETS, 1.0)
}

impl Registry {
    fn series(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        make: impl FnOnce() -> Series,
    ) -> Series {
        let key = render_labels(labels);
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let family = families.entry(name).or_insert_with(|| Family {
            help,
            series: BTreeMap::new(),
        });
        family.series.entry(key).or_insert_with(make).clone()
    }

    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Counter {
        match self.series(name, help, labels, || Series::Counter(Counter::default())) {
            Series::Counter(c) => c,
            _ => Counter::default(),
        }
    }

    pub fn gauge(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Gauge {
        match self.series(name, help, labels, || Series::Gauge(Gauge::default())) {
            Series::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        bounds: &'static [u64],
        scale: f64,
    ) -> Histogram {
        let make = || {
            Histogram(Arc::new(HistogramInner {
                bounds,
                scale,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicU64::new(0),
                count: AtomicU64::new(0),
            }))
        };
        match self.series(name, help, labels, || Series::Histogram(make())) {
            Series::Histogram(h) => h,
            _ => make(),
        }
    }

    /// Removes one series (a label value that no longer holds, such as an old config hash).
    pub fn remove(&self, name: &'static str, labels: &[(&str, &str)]) {
        let key = render_labels(labels);
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(family) = families.get_mut(name) {
            family.series.remove(&key);
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::with_capacity(16 * 1024);
        for (name, family) in families.iter() {
            let kind = match family.series.values().next() {
                Some(Series::Counter(_)) => "counter",
                Some(Series::Gauge(_)) => "gauge",
                Some(Series::Histogram(_)) => "histogram",
                None => continue,
            };
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, series) in &family.series {
                match series {
                    Series::Counter(c) => {
                        let _ = writeln!(out, "{name}{} {}", braces(labels), c.get());
                    }
                    Series::Gauge(g) => {
                        let _ = writeln!(out, "{name}{} {}", braces(labels), g.get());
                    }
                    Series::Histogram(h) => render_histogram(&mut out, name, labels, &h.0),
                }
            }
        }
        out
    }
}

fn render_histogram(out: &mut String, name: &str, labels: &str, h: &HistogramInner) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, bucket) in h.buckets.iter().enumerate() {
        cumulative += bucket.load(Ordering::Relaxed);
        let le = match h.bounds.get(i) {
            Some(b) => format_float(*b as f64 * h.scale),
            None => "+Inf".to_string(),
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    let sum = h.sum.load(Ordering::Relaxed) as f64 * h.scale;
    let _ = writeln!(out, "{name}_sum{} {}", braces(labels), format_float(sum));
    let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
}

fn format_float(v: f64) -> String {
    let s = format!("{v:.9}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".to_string()
    } else {
        s.to_string()
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets_in_seconds() {
        let r = Registry::default();
        let h = r.histogram(
            "t_latency_seconds",
            "help",
            &[("chain", "a")],
            LATENCY_BUCKETS_NS,
            1e-9,
        );
        h.observe(7_000);
        h.observe(20_000_000_000);
        let text = r.render();
        assert!(
            text.contains("# TYPE t_latency_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_seconds_bucket{chain=\"a\",le=\"0.000005\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_seconds_bucket{chain=\"a\",le=\"0.00001\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_seconds_bucket{chain=\"a\",le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_seconds_count{chain=\"a\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn same_series_is_shared_and_labels_are_escaped() {
        let r = Registry::default();
        r.counter("c_total", "help", &[("name", "a\"b")]).inc();
        r.counter("c_total", "help", &[("name", "a\"b")]).add(2);
        assert!(r.render().contains("c_total{name=\"a\\\"b\"} 3"));
    }
}
