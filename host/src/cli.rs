//! The `signalbox` command line.

mod policy_cmd;
mod scaffold;
mod serve_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "signalbox",
    version,
    about = "PostgreSQL routing driven by WebAssembly policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the routing service.
    Serve {
        /// The configuration file.
        #[arg(long, short, default_value = "signalbox.toml")]
        config: std::path::PathBuf,
    },
    /// Start a throwaway primary + two replicas and signalbox in front of them.
    Demo {
        /// Port for clients.
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Port for the admin API.
        #[arg(long, default_value_t = 9930)]
        admin_port: u16,
        /// Threads serving clients (default: half the cores, at least one).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Write, inspect, try and benchmark routing policies.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIGNALBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files
        // or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => {
            // A report piped into `head` ends quietly, as other tools do,
            // instead of panicking on EPIPE. (Only here: the server keeps
            // SIGPIPE ignored, so a vanished client is an error, not death.)
            // SAFETY: setting a signal disposition before any thread starts.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            policy_cmd::run(cmd)
        }
        Command::Serve { config } => serve_cmd::serve(&config),
        Command::Demo {
            port,
            admin_port,
            workers,
        } => serve_cmd::demo(port, admin_port, workers),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
