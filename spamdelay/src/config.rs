//! The config file: `run`'s flags as TOML keys (`iface = ["eth0"]`,
//! `ban-time = "2h"`, `dry-run = true`). Settings become command-line
//! arguments placed before the real ones, so clap checks them the same way
//! and the command line wins; lists (`iface`, `port`, `allow`) add up.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use clap::CommandFactory;

use crate::cli::Cli;

/// Read when it exists and no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/spamdelay/spamdelay.toml";

/// `argv` with the config file's settings spliced in after `run`. Other
/// subcommands are left alone.
pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(run_at) = subcommand_index(&argv, "run") else {
        return Ok(argv);
    };
    let explicit = config_flag(&argv);
    let path = match &explicit {
        Some(p) => p.clone(),
        None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
        None => return Ok(argv),
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let settings =
        to_args(&text).with_context(|| format!("in the config file {}", path.display()))?;
    let mut out = argv[..=run_at].to_vec();
    out.extend(settings.into_iter().map(OsString::from));
    out.extend_from_slice(&argv[run_at + 1..]);
    Ok(out)
}

/// Index of the subcommand word, skipping global options and their values.
fn subcommand_index(argv: &[OsString], name: &str) -> Option<usize> {
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_str()?;
        if a == "--state-dir" || a == "--config" {
            i += 2;
            continue;
        }
        if a.starts_with('-') {
            i += 1;
            continue;
        }
        return (a == name).then_some(i);
    }
    None
}

fn config_flag(argv: &[OsString]) -> Option<PathBuf> {
    argv.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_str()?;
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
        (a == "--config")
            .then(|| argv.get(i + 1).map(PathBuf::from))
            .flatten()
    })
}

/// TOML settings as `--key value` arguments for `run`.
pub fn to_args(text: &str) -> Result<Vec<String>> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let cmd = Cli::command();
    let run = cmd
        .find_subcommand("run")
        .context("clap has no run subcommand")?;
    let mut args = Vec::new();
    for (key, value) in &table {
        let known = key == "state-dir"
            || run
                .get_arguments()
                .any(|a| a.get_long() == Some(key.as_str()));
        if !known {
            bail!(
                "unknown setting '{key}': the settings are run's flags without dashes, see `spamdelay run --help`"
            );
        }
        let flag = format!("--{key}");
        let values = match value {
            toml::Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        for v in values {
            match v {
                toml::Value::Boolean(true) => args.push(flag.clone()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => args.extend([flag.clone(), s]),
                toml::Value::Integer(n) => args.extend([flag.clone(), n.to_string()]),
                other => bail!("setting '{key}': {other} is not a string, number or true/false"),
            }
        }
    }
    Ok(args)
}

/// `spamdelay check-config`: reads the file as `run` would, checks every
/// value the way `run` checks it, and prints the settings `run` would start
/// with, each marked with where it comes from. A file without an interface
/// is valid (the package ships one), but `run` refuses to start until one
/// is set: that is said, not failed.
pub fn check(explicit: Option<&Path>) -> Result<()> {
    let path = explicit.map_or_else(|| PathBuf::from(DEFAULT_PATH), Path::to_path_buf);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the config file {}{}",
            path.display(),
            if explicit.is_none() {
                " (or name one with --config FILE)"
            } else {
                ""
            }
        )
    })?;
    let settings =
        to_args(&text).with_context(|| format!("in the config file {}", path.display()))?;
    let (args, matches) =
        parse_run(&settings).with_context(|| format!("in the config file {}", path.display()))?;
    for iface in &args.ifaces {
        crate::loader::check_interface(iface)
            .with_context(|| format!("in the config file {}", path.display()))?;
    }
    let mta = crate::mta::detect(args.mta, args.mta_config.as_deref()).with_context(|| {
        format!(
            "reading the MTA's configuration named in {}",
            path.display()
        )
    })?;
    println!("{}: valid", path.display());
    let cmd = Cli::command();
    let run = cmd
        .find_subcommand("run")
        .context("clap has no run subcommand")?;
    for arg in run.get_arguments() {
        let Some(long) = arg.get_long() else {
            continue;
        };
        if matches!(long, "help" | "version" | "config") {
            continue;
        }
        let id = arg.get_id().as_str();
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let from = match matches.value_source(id) {
            Some(clap::parser::ValueSource::DefaultValue) => "  # default",
            None => "  # not set",
            _ => "",
        };
        let shown = match values.as_slice() {
            [] => "(none)".to_string(),
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        println!("{long} = {shown}{from}");
    }
    match &mta {
        Some(m) => println!("# MTA: {m}"),
        None => println!("# MTA: none found or read"),
    }
    if args.ifaces.is_empty() {
        println!(
            "note: no interface set (iface = [\"eth0\"]): `spamdelay run` refuses to start until one is"
        );
    }
    Ok(())
}

/// clap's error as one line, without its usage and help.
pub(crate) fn first_line(e: clap::Error) -> anyhow::Error {
    let text = e.to_string();
    anyhow::anyhow!(
        "{}",
        text.lines()
            .next()
            .unwrap_or("bad settings")
            .trim_start_matches("error: ")
    )
}

/// `run`'s arguments from settings alone, the interface not required.
fn parse_run(settings: &[String]) -> Result<(crate::cli::RunArgs, clap::ArgMatches)> {
    use clap::FromArgMatches;
    let cmd = Cli::command().mut_subcommand("run", |c| c.mut_arg("ifaces", |a| a.required(false)));
    let argv = ["spamdelay", "run"]
        .into_iter()
        .map(String::from)
        .chain(settings.iter().cloned());
    let matches = cmd.try_get_matches_from(argv).map_err(first_line)?;
    let run = matches
        .subcommand_matches("run")
        .context("clap gave no run matches")?
        .clone();
    let args = crate::cli::RunArgs::from_arg_matches(&run).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((args, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_flags() {
        let args = to_args(
            "iface = [\"eth0\", \"eth1\"]\nport = [25, 587]\nban-time = \"2h\"\ndry-run = true\nban-quitters = false\n",
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "--ban-time",
                "2h",
                "--dry-run",
                "--iface",
                "eth0",
                "--iface",
                "eth1",
                "--port",
                "25",
                "--port",
                "587"
            ]
        );
    }

    #[test]
    fn unknown_settings_are_named() {
        let err = to_args("bantime = \"1h\"").unwrap_err().to_string();
        assert!(err.starts_with("unknown setting 'bantime'"), "{err}");
        assert!(to_args("iface = [").is_err());
    }

    #[test]
    fn settings_go_right_after_run() {
        let dir = std::env::temp_dir().join(format!("spamdelay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "ban-time = \"2h\"\n").unwrap();
        let argv: Vec<OsString> = [
            "spamdelay",
            "--config",
            file.to_str().unwrap(),
            "run",
            "--ban-time",
            "3h",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out = expand(argv).unwrap();
        let words: Vec<&str> = out.iter().filter_map(|a| a.to_str()).collect();
        assert_eq!(&words[3..], ["run", "--ban-time", "2h", "--ban-time", "3h"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
