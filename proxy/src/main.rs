//! The `shotover` binary: parses flags, builds the runtime, runs the proxy.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let opts = shotover::Opts::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_stack_size(opts.stack_size);
    if let Some(threads) = opts.core_threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shotover: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(shotover::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shotover: {e:#}");
            ExitCode::FAILURE
        }
    }
}
