//! The `shotover-webhook` binary.

use std::process::ExitCode;

use clap::Parser;
use shotover_webhook::{LogFormat, Opts};

fn main() -> ExitCode {
    let opts = Opts::parse();
    shotover_operator::init_logging(matches!(opts.log_format, LogFormat::Json));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shotover-webhook: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(shotover_webhook::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
