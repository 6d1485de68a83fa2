//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/` for a bounded time,
//! seeded with real examples, then one line per target. Not part of `test`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{nightly_cargo, run};

/// How `fuzz/harness.rs` splits one input into two files.
const MASTER_CF: &str = "\n--- master.cf ---\n";

/// A unit slower than this is a failure (a parser that blows up on some
/// input), not something to wait 20 minutes (libFuzzer's default) for.
const UNIT_TIMEOUT_SECS: u64 = 10;

pub fn fuzz(root: &Path, secs: u64, only: &[String]) -> Result<()> {
    ensure_cargo_fuzz()?;
    let dir = root.join("fuzz");
    let all = list_targets(&dir)?;
    let targets: Vec<String> = if only.is_empty() {
        all
    } else {
        for t in only {
            if !all.contains(t) {
                bail!("no fuzz target '{t}': the targets are {}", all.join(", "));
            }
        }
        only.to_vec()
    };
    run(nightly_cargo(&dir).args(["fuzz", "build"])).context("building the fuzz targets")?;
    let logs = dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut report = Vec::new();
    let mut failed = 0;
    for t in &targets {
        let corpus = dir.join("corpus").join(t);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let copied = seed_from_system(root, t, &corpus)?;
        let log = logs.join(format!("{t}.log"));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = nightly_cargo(&dir);
        cmd.args(["fuzz", "run", t]).arg(&corpus);
        // Read, never written: libFuzzer adds new inputs to the first directory.
        for extra in ["seeds", "regressions"] {
            let d = dir.join(extra).join(t);
            if d.is_dir() {
                cmd.arg(d);
            }
        }
        cmd.arg("--");
        // The target's keywords, so it need not guess `begin acl` byte by byte.
        let dict = dir.join("dicts").join(format!("{t}.dict"));
        if dict.is_file() {
            cmd.arg(format!("-dict={}", dict.display()));
        }
        cmd.arg(format!("-max_total_time={secs}"))
            .arg(format!("-timeout={UNIT_TIMEOUT_SECS}"))
            .arg("-print_final_stats=1")
            .stdout(out.try_clone()?)
            .stderr(out);
        eprintln!(
            "xtask: fuzzing {t} for {secs}s, seeds from this machine: {copied}, log: {}",
            log.display()
        );
        let status = cmd
            .status()
            .with_context(|| format!("running cargo fuzz run {t}"))?;
        let text = fs::read_to_string(&log).unwrap_or_default();
        let stats = Stats::parse(&text);
        if status.success() {
            report.push(format!(
                "{t}: ok, {} execs in {}s, coverage {}, corpus {}",
                stats.execs, stats.secs, stats.cov, stats.corpus
            ));
        } else {
            failed += 1;
            let what = text
                .lines()
                .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
                .map_or_else(|| format!("{status}"), |p| format!("input in {p}"));
            report.push(format!(
                "{t}: FAILED after {} execs: {what}; see {}",
                stats.execs,
                log.display()
            ));
        }
    }
    println!("fuzzing, {secs}s per target:");
    for line in &report {
        println!("  {line}");
    }
    if failed > 0 {
        bail!(
            "{failed} of {} targets failed: fix the parser, keep the input under fuzz/regressions/TARGET/ (spamdelay/tests/fuzz_regressions.rs replays them)",
            targets.len()
        );
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    if Command::new("cargo-fuzz").arg("--version").output().is_ok() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (a few minutes)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// The targets fuzz/Cargo.toml declares.
fn list_targets(dir: &Path) -> Result<Vec<String>> {
    let out = nightly_cargo(dir)
        .args(["fuzz", "list"])
        .output()
        .context("running cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// Copies this machine's real examples of a target's input into its corpus
/// (fuzz/seeds/ holds the committed ones); returns how many.
fn seed_from_system(root: &Path, target: &str, corpus: &Path) -> Result<usize> {
    let read = |p: &str| fs::read(p).ok();
    let files: &[&str] = match target {
        "config" => &["/etc/spamdelay/spamdelay.toml"],
        "register" => &["/var/lib/spamdelay/bans.json"],
        "pass_cache" => &["/var/lib/spamdelay/pass-cache.json"],
        "exim" => &["/etc/exim4/exim4.conf", "/etc/exim4/exim4.conf.template"],
        "sendmail" => &["/etc/mail/sendmail.cf"],
        _ => &[],
    };
    let mut found: Vec<(String, Vec<u8>)> = files
        .iter()
        .filter_map(|p| Some((p.to_string(), read(p)?)))
        .collect();
    if target == "postfix" {
        for (main, master) in [
            ("/etc/postfix/main.cf", "/etc/postfix/master.cf"),
            ("/etc/postfix/main.cf.proto", "/etc/postfix/master.cf.proto"),
        ] {
            if let (Some(mut both), Some(master_text)) = (read(main), read(master)) {
                both.extend_from_slice(MASTER_CF.as_bytes());
                both.extend_from_slice(&master_text);
                found.push((main.to_string(), both));
            }
        }
    }
    if target == "config" {
        // The README's example config file.
        let readme = fs::read_to_string(root.join("README.md")).unwrap_or_default();
        for (i, block) in readme.split("```toml\n").skip(1).enumerate() {
            if let Some((toml, _)) = block.split_once("```") {
                found.push((format!("readme-{i}"), toml.as_bytes().to_vec()));
            }
        }
    }
    for (name, bytes) in &found {
        let file: PathBuf = corpus.join(format!("example-{}", name.replace('/', "_")));
        fs::write(&file, bytes).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(found.len())
}

/// What libFuzzer's last lines say (`-print_final_stats=1`).
struct Stats {
    execs: String,
    secs: String,
    cov: String,
    corpus: String,
}

impl Stats {
    fn parse(log: &str) -> Self {
        let mut s = Stats {
            execs: "?".into(),
            secs: "?".into(),
            cov: "?".into(),
            corpus: "?".into(),
        };
        for line in log.lines() {
            if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                s.execs = n.trim().to_string();
            }
            // `Done 123456 runs in 31 second(s)`
            if let Some(rest) = line.strip_prefix("Done ")
                && let Some((_, t)) = rest.split_once(" runs in ")
            {
                s.secs = t.split_whitespace().next().unwrap_or("?").to_string();
            }
            // `#123456 DONE cov: 812 ft: 2051 corp: 301/25Kb ...`
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                match w {
                    "cov:" => s.cov = words.next().unwrap_or("?").to_string(),
                    "corp:" => s.corpus = words.next().unwrap_or("?").to_string(),
                    _ => {}
                }
            }
        }
        s
    }
}
