//! The `shotover-webhook` binary.

use std::process::ExitCode;

use clap::Parser;
use shotover_webhook::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = match cli.command {
        Some(Command::Inject(inject)) => {
            return match shotover_webhook::offline::run(&inject) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("shotover-webhook inject: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Serve(opts)) => *opts,
        None => cli.serve,
    };
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
