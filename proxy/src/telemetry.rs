//! Logging: `tracing` to stderr, human-readable or JSON, with a filter that can be changed
//! at run time (`PUT /filter`).

use std::io::IsTerminal;

use anyhow::{Context, Result};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct FilterHandle(reload::Handle<EnvFilter, Registry>);

impl FilterHandle {
    pub fn set(&self, directives: &str) -> Result<()> {
        let filter = EnvFilter::try_new(directives)
            .with_context(|| format!("invalid log filter `{directives}`"))?;
        self.set_parsed(filter)
    }

    pub fn set_parsed(&self, filter: EnvFilter) -> Result<()> {
        self.0.reload(filter).context("replacing the log filter")
    }
}

/// Parses `main_log_level`.
pub fn parse_filter(directives: &str) -> Result<EnvFilter> {
    EnvFilter::try_new(directives)
        .with_context(|| format!("main_log_level: invalid log filter `{directives}`"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Installs the global subscriber with `directives` as the initial filter.
pub fn init(directives: &str, format: LogFormat) -> Result<FilterHandle> {
    let filter = EnvFilter::try_new(directives)
        .with_context(|| format!("main_log_level: invalid log filter `{directives}`"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.context("installing the log subscriber")?;
    Ok(FilterHandle(handle))
}
