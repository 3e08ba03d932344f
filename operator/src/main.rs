//! The `shotover-operator` binary: `run` (the default) reconciles ShotoverTopologies; `crd`
//! prints the CustomResourceDefinition to install.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shotover_operator::RunOpts;

#[derive(Debug, Parser)]
#[command(
    name = "shotover-operator",
    version,
    about = "Runs ShotoverTopologies on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunOpts,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reconcile ShotoverTopologies (the default).
    Run(RunOpts),
    /// Print the ShotoverTopology CRD as YAML (`| kubectl apply --server-side -f -`).
    Crd,
    /// GET each URL (`http://host:port/path`) and exit 0 if every one answers 200 within
    /// 5 s: the chart's `helm test`.
    Check { urls: Vec<String> },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Crd) = cli.command {
        print!("{}", shotover_crds::crd::crd_yaml());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Check { urls }) = &cli.command {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("shotover-operator: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut ok = !urls.is_empty();
        for url in urls {
            match runtime.block_on(shotover_operator::reports::check_url(url)) {
                Ok(status) => println!("{url}: {status}"),
                Err(why) => {
                    println!("{url}: {why}");
                    ok = false;
                }
            }
        }
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    shotover_operator::init_logging(matches!(cli.log_format, LogFormat::Json));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shotover-operator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = match cli.command {
        Some(Command::Run(opts)) => opts,
        _ => cli.run,
    };
    match runtime.block_on(shotover_operator::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
