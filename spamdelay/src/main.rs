//! The `spamdelay` command: parse, set up logging, dispatch.

use std::{io::Write, process::ExitCode};

use clap::Parser;
use spamdelay::{
    admin,
    bans::Store,
    cli::{Cli, Command},
    config,
};
use systemd_journal_logger::JournalLog;

fn main() -> ExitCode {
    let argv = match config::expand(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("spamdelay: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    let journal = init_logging();
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
                    Command::CheckConfig => config::check(cli.config.as_deref()),
                }
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: every context joined with ": ".
            if journal {
                log::error!("{e:#}");
            } else {
                eprintln!("spamdelay: error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Verdicts and notices as bare lines (syslog adds the time); warnings and
/// errors prefixed like Postfix's. Under systemd (stderr is the journal's
/// stream, `JOURNAL_STREAM`) records go to the journal itself instead, with
/// their priority and the fields the log calls carry (`SPAMDELAY_VERDICT`,
/// `SPAMDELAY_CLIENT`, `SPAMDELAY_BAN_TIME`). `RUST_LOG` filters either way.
/// Returns whether the journal gets them.
fn init_logging() -> bool {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if systemd_journal_logger::connected_to_journal() {
        match JournalLog::new() {
            Ok(journal) => {
                let filter = builder.build();
                log::set_max_level(filter.filter());
                // Only fails when a logger is set already, which none is.
                let _ = log::set_boxed_logger(Box::new(Journal { filter, journal }));
                return true;
            }
            Err(e) => eprintln!(
                "warning: the journal's socket {JOURNAL_SOCKET} is not reachable ({e}): logging to stderr"
            ),
        }
    }
    builder
        // Plain lines: no colour detection and stripping on every record.
        .write_style(env_logger::WriteStyle::Never)
        .format(|buf, record| match record.level() {
            log::Level::Info => writeln!(buf, "{}", record.args()),
            log::Level::Warn => writeln!(buf, "warning: {}", record.args()),
            level => writeln!(buf, "{}: {}", level.as_str().to_lowercase(), record.args()),
        })
        .init();
    false
}

/// Where systemd-journal-logger sends its records.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The journal, behind the same `RUST_LOG` filter as stderr.
struct Journal {
    filter: env_logger::Logger,
    journal: JournalLog,
}

impl log::Log for Journal {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if self.filter.matches(record) {
            self.journal.log(record);
        }
    }

    fn flush(&self) {}
}
