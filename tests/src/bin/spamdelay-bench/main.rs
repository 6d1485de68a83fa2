//! `cargo xtask bench [--quick]`: spamdelay measured against baselines in a
//! namespace lab, each comparison alternated A/B in rounds within one run so
//! a noisy machine shows up as spread rather than as a fake result. Prints a
//! markdown table, writes JSON and SVG plots to target/bench/, and exits
//! non-zero only when a measurement could not run, never because of a number.

mod load;
mod phases;
mod plot;
mod report;
mod rounds;

use std::{
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use serde_json::{Value, json};
use spamdelay_tests::daemon;

use crate::{
    load::check_tools,
    phases::{PHASES, Plan},
    plot::Samples,
    report::{Row, Verdict, bench_dir, commit, kernel_release, markdown, write_json},
};

/// spamdelay measured against baselines in a namespace lab, A/B in rounds.
#[derive(Parser)]
#[command(
    name = "spamdelay-bench",
    after_help = "Run it through `cargo xtask bench`, which builds everything in release mode\n\
                  and points SPAMDELAY_BIN at the release daemon."
)]
struct Args {
    /// Fewer rounds and clients (about a minute instead of 10).
    #[arg(long)]
    quick: bool,
    /// Run only these measurements, e.g. `--only 1,4` (1 kernel cost,
    /// 2 throughput, 3 SMTP connection rate, 4 time to ban, 5 flood scale,
    /// 6 fail2ban, 7 bridge block, 8 fleet propagation).
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',', value_parser = phase_number)]
    only: Option<Vec<u8>>,
}

/// One of `--only`'s numbers; spaces around it are allowed ("1, 4").
fn phase_number(s: &str) -> Result<u8, std::num::ParseIntError> {
    s.trim().parse()
}

/// Raised by the SIGINT/SIGTERM/SIGHUP handler; every phase looks at it
/// between steps.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub(crate) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

fn main() -> ExitCode {
    let Args { quick, only } = Args::parse();
    match run(quick, only) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench: cannot run: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(quick: bool, only: Option<Vec<u8>>) -> Result<ExitCode> {
    // A handler that only raises a flag: a Ctrl-C then unwinds the phase
    // that runs at its next step, and its guards remove namespaces, servers
    // and the sysctl. (Blocking the signals instead would pass the mask on
    // to every child: the daemon would ignore the SIGTERM that stops it.)
    let on_signal = SigAction::new(
        SigHandler::Handler(note_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(s, &on_signal) }.with_context(|| format!("handling {s}"))?;
    }

    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark builds network namespaces and loads eBPF: run it as root");
    }
    check_tools()?;
    let bin = daemon::binary();
    if !bin.components().any(|c| c.as_os_str() == "release") {
        eprintln!(
            "bench: warning: the daemon is {} (not a release build): run `cargo xtask bench`",
            bin.display()
        );
    }
    let plan = Plan::new(quick);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut phases = serde_json::Map::new();
    let mut samples = Samples::default();
    let mut failed = false;
    for (n, name, phase) in PHASES {
        if only.as_ref().is_some_and(|o| !o.contains(&n)) {
            continue;
        }
        eprintln!("bench: == {n}. {name}");
        let t = Instant::now();
        let result = phase(&plan);
        check_interrupted()?;
        match result {
            Ok(out) => {
                eprintln!("bench: {n}. done in {:.0}s", t.elapsed().as_secs_f64());
                rows.extend(out.rows.into_iter().map(|mut r| {
                    r.metric = format!("{n}. {}", r.metric);
                    r
                }));
                notes.extend(out.notes.into_iter().map(|s| format!("{n}. {s}")));
                samples.merge(out.samples);
                let mut detail = out.detail;
                detail.insert("seconds".into(), json!(t.elapsed().as_secs_f64()));
                phases.insert(format!("{n}"), Value::Object(detail));
            }
            Err(e) => {
                failed = true;
                eprintln!("bench: {n}. {name} could not run: {e:#}");
                let mut row = Row::info(format!("{n}. {name}"), format!("{e:#}"));
                row.verdict = Verdict::Failed;
                rows.push(row);
                phases.insert(format!("{n}"), json!({"error": format!("{e:#}")}));
            }
        }
    }

    let table = markdown(&rows);
    println!(
        "\n## spamdelay bench{} (kernel {}, {} CPUs)\n",
        if plan.quick { " --quick" } else { "" },
        kernel_release(),
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{table}");
    if !notes.is_empty() {
        println!();
        for n in &notes {
            println!("- {n}");
        }
    }
    let doc = json!({
        "unix_time": started,
        "commit": commit(),
        "quick": plan.quick,
        "kernel": kernel_release(),
        "cpus": thread::available_parallelism().map_or(0, |n| n.get()),
        "daemon": bin.display().to_string(),
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "notes": notes,
        "phases": phases,
    });
    let dir = bench_dir()?;
    let path = write_json(&dir, &doc, started)?;
    println!("\nJSON: {}", path.display());
    // The numbers are out by now: a plot that cannot be drawn only fails
    // the run.
    match plot::write(&dir, &samples) {
        Ok(svgs) => {
            for svg in svgs {
                println!("SVG: {}", svg.display());
            }
        }
        Err(e) => {
            failed = true;
            eprintln!("bench: no plots: {e:#}");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
