//! The process-wide budget for reply bytes the proxy holds: replies read from an upstream
//! and not written to their client yet. Each connection has its own cap (a sink's
//! `max_buffered_reply_bytes`); this budget protects the process (a sidecar's memory limit)
//! when many connections hold replies at once. Over the budget, every connection takes one
//! reply at a time until it has written what it holds, and on shared upstream connections
//! every reply takes room in its client's cap (no slack for small batches).
//!
//! Bytes are counted with [`Held`] guards, one per batch of replies of at least 64 KiB, so
//! the count costs nothing for small batches and an atomic add and subtract per large one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::metrics::{self, Gauge};

static BUDGET: AtomicUsize = AtomicUsize::new(DEFAULT_WITHOUT_LIMIT);

/// The budget when the process has no memory limit.
const DEFAULT_WITHOUT_LIMIT: usize = 1024 * 1024 * 1024;

fn held_gauge() -> &'static Gauge {
    static HELD: OnceLock<Gauge> = OnceLock::new();
    HELD.get_or_init(|| {
        metrics::gauge(
            "shotover_buffered_reply_bytes",
            "Reply bytes read from upstreams and not written to their clients yet.",
            &[],
        )
    })
}

/// Sets the budget (`config.yaml`'s `max_buffered_reply_bytes`), or the default: half the
/// memory limit of the process's cgroup, or 1 GiB without one. Returns the budget in force.
pub fn configure(bytes: Option<usize>) -> usize {
    let budget = bytes.unwrap_or_else(|| {
        cgroup_memory_limit()
            .map(|limit| limit / 2)
            .unwrap_or(DEFAULT_WITHOUT_LIMIT)
    });
    BUDGET.store(budget, Ordering::Relaxed);
    metrics::gauge(
        "shotover_buffered_reply_bytes_budget",
        "The process-wide budget for reply bytes held for clients (max_buffered_reply_bytes).",
        &[],
    )
    .set(budget as i64);
    held_gauge();
    budget
}

/// Whether the replies held across the process exceed the budget.
pub fn over() -> bool {
    held_gauge().get() > BUDGET.load(Ordering::Relaxed) as i64
}

/// Counts `n` bytes as held until dropped.
#[must_use]
pub struct Held(usize);

impl Held {
    /// Counts `n` bytes if they are at least 64 KiB: smaller amounts are left out, so that
    /// the common small batches never write the count other threads read.
    pub fn new(n: usize) -> Held {
        if n < STEP {
            return Held(0);
        }
        held_gauge().add(n as i64);
        Held(n)
    }
}

/// Bytes a run collects before they count against the budget: small runs never touch the
/// shared count.
const STEP: usize = 64 * 1024;

/// Counts the bytes a sink collects during one run, in steps of 64 KiB, until dropped.
#[derive(Default)]
pub struct Tally {
    uncounted: usize,
    held: Option<Held>,
}

impl Tally {
    pub fn add(&mut self, n: usize) {
        self.uncounted += n;
        if self.uncounted >= STEP {
            let n = std::mem::take(&mut self.uncounted);
            held_gauge().add(n as i64);
            match &mut self.held {
                Some(held) => held.0 += n,
                None => self.held = Some(Held(n)),
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.0 > 0 {
            held_gauge().add(-(self.0 as i64));
        }
    }
}

/// The memory limit of this process's cgroup (v2, else v1), if it has one.
fn cgroup_memory_limit() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let own = read("/proc/self/cgroup")?;
    for line in own.lines() {
        // v2: `0::/path`; v1: `N:memory:/path`.
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (root, file) = if controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        // Inside a container its own cgroup is mounted at the root.
        for dir in [format!("{root}{path}"), root.to_string()] {
            if let Some(limit) = read(&format!("{dir}/{file}"))
                .and_then(|t| t.trim().parse::<usize>().ok())
                .filter(|l| *l < 1 << 60)
            {
                return Some(limit);
            }
        }
    }
    None
}

/// The process-wide budget for request bytes the proxy holds: requests read from clients
/// that are not complete yet (a large value arriving), in the connections' read buffers.
/// Each frame is capped by its source's `max_frame_size_bytes`; this budget caps their sum,
/// so that many clients sending large frames at once cannot take the process past its
/// memory limit. A connection whose incomplete request would take the total over the budget
/// is refused: a protocol error, and that connection is closed (the rest of its frame is
/// never read). Only buffers of at least 64 KiB count, so small requests cost nothing and
/// are never refused.
pub mod requests {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::metrics::{self, Counter, Gauge};

    static BUDGET: AtomicUsize = AtomicUsize::new(DEFAULT_WITHOUT_LIMIT);

    /// The budget when the process has no memory limit.
    const DEFAULT_WITHOUT_LIMIT: usize = 512 * 1024 * 1024;

    fn gauge() -> &'static Gauge {
        static HELD: OnceLock<Gauge> = OnceLock::new();
        HELD.get_or_init(|| {
            metrics::gauge(
                "shotover_buffered_request_bytes",
                "Bytes of incomplete client requests held in read buffers of 64 KiB or more.",
                &[],
            )
        })
    }

    /// Times a connection was refused for taking the buffered requests over the budget.
    pub fn refusals() -> &'static Counter {
        static REFUSED: OnceLock<Counter> = OnceLock::new();
        REFUSED.get_or_init(|| {
            metrics::counter(
                "shotover_buffered_request_budget_refusals_count",
                "Client connections refused (protocol error, closed) because their incomplete request took the buffered request bytes over max_buffered_request_bytes.",
                &[],
            )
        })
    }

    /// Sets the budget (`config.yaml`'s `max_buffered_request_bytes`), or the default: a
    /// quarter of the memory limit of the process's cgroup, or 512 MiB without one.
    /// Returns the budget in force.
    pub fn configure(bytes: Option<usize>) -> usize {
        let budget = bytes.unwrap_or_else(|| {
            super::cgroup_memory_limit()
                .map(|limit| limit / 4)
                .unwrap_or(DEFAULT_WITHOUT_LIMIT)
        });
        BUDGET.store(budget, Ordering::Relaxed);
        metrics::gauge(
            "shotover_buffered_request_bytes_budget",
            "The process-wide budget for incomplete request bytes (max_buffered_request_bytes).",
            &[],
        )
        .set(budget as i64);
        gauge();
        refusals();
        budget
    }

    /// The budget in force.
    pub fn budget() -> usize {
        BUDGET.load(Ordering::Relaxed)
    }

    /// One connection's share of the count: its read buffer, when at least 64 KiB.
    #[derive(Default)]
    pub struct Buffered(usize);

    impl Buffered {
        /// Counts `n` bytes for this connection (nothing under 64 KiB). Returns the total
        /// held by the process when that is over the budget.
        pub fn set(&mut self, n: usize) -> Option<usize> {
            let n = if n < super::STEP { 0 } else { n };
            if n == self.0 {
                return None;
            }
            let total = gauge().add(n as i64 - self.0 as i64);
            self.0 = n;
            (n > 0 && total > budget() as i64).then_some(total as usize)
        }
    }

    impl Drop for Buffered {
        fn drop(&mut self) {
            if self.0 > 0 {
                gauge().add(-(self.0 as i64));
            }
        }
    }
}
