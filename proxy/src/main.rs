//! The `shotover` binary: parses flags, builds the runtime, runs the proxy.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let opts = shotover::Opts::parse();
    let built = if opts.thread_per_core {
        // One single-threaded runtime per core runs the connections; this one accepts them.
        let threads = opts.core_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        shotover::runtime::start_workers(threads, opts.stack_size).and_then(|()| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_stack_size(opts.stack_size);
        if let Some(threads) = opts.core_threads {
            builder.worker_threads(threads.max(1));
        }
        builder.build()
    };
    let runtime = match built {
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
