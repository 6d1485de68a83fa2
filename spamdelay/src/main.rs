//! The `spamdelay` command: parse, set up logging, dispatch.

use std::{io::Write, process::ExitCode};

use clap::Parser;
use spamdelay::{
    admin,
    bans::Store,
    cli::{Cli, Command},
    config,
};

fn main() -> ExitCode {
    let argv = match config::expand(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("spamdelay: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    init_logging();
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let store = Store::new(&cli.state_dir);
                match cli.command {
                    Command::Run(args) => spamdelay::daemon::run(*args, cli.state_dir).await,
                    Command::List { json } => admin::list(&store, json),
                    Command::Ban { cidr, time, reason } => {
                        admin::ban(&store, cidr, time, &reason).await
                    }
                    Command::Unban { cidr } => admin::unban(&store, &cli.state_dir, cidr).await,
                    Command::Status { json } => admin::status(&store, &cli.state_dir, json).await,
                    Command::Detach { pin_dir } => admin::detach(&cli.state_dir, &pin_dir),
                }
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: every context joined with ": ".
            eprintln!("spamdelay: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Verdicts and notices as bare lines (journald and syslog add the time);
/// warnings and errors prefixed like Postfix's.
fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        // Plain lines: no colour detection and stripping on every record.
        .write_style(env_logger::WriteStyle::Never)
        .format(|buf, record| match record.level() {
            log::Level::Info => writeln!(buf, "{}", record.args()),
            log::Level::Warn => writeln!(buf, "warning: {}", record.args()),
            level => writeln!(buf, "{}: {}", level.as_str().to_lowercase(), record.args()),
        })
        .init();
}
