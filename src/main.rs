//! The `agentbus` binary: parse the command line, start logging, run.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = agentbus::cli::Cli::parse();
    agentbus::telemetry::init_logging(&cli.log, cli.log_json);
    match agentbus::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
