//! The report: table rows and their verdicts, the markdown table on stdout,
//! and the JSON document (with the commit and kernel measured) in target/bench/.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use spamdelay_tests::bench::Spread;

use crate::plot::Samples;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Met,
    Missed,
    /// Reported without a target.
    Info,
    /// Something happened that must not (a patient client banned).
    Bug,
    /// The measurement could not run.
    Failed,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::Info => "—",
            Verdict::Bug => "**BUG**",
            Verdict::Failed => "**could not run**",
        }
    }

    pub(crate) fn of(met: bool) -> Verdict {
        if met { Verdict::Met } else { Verdict::Missed }
    }
}

/// The ratio cell: A/B per round, or one ratio of two distributions.
pub(crate) enum Ratio {
    None,
    Rounds(Spread),
    Single(f64),
}

pub(crate) struct Row {
    pub(crate) metric: String,
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) ratio: Ratio,
    pub(crate) target: String,
    pub(crate) verdict: Verdict,
}

impl Row {
    pub(crate) fn info(metric: impl Into<String>, a: impl Into<String>) -> Row {
        Row {
            metric: metric.into(),
            a: a.into(),
            b: "—".into(),
            ratio: Ratio::None,
            target: "—".into(),
            verdict: Verdict::Info,
        }
    }

    pub(crate) fn json(&self) -> Value {
        let ratio = match self.ratio {
            Ratio::None => Value::Null,
            Ratio::Rounds(s) => json!({"min": s.min, "median": s.median, "max": s.max}),
            Ratio::Single(r) => json!({"single": r}),
        };
        json!({
            "metric": self.metric,
            "a": self.a,
            "b": self.b,
            "ratio": ratio,
            "target": self.target,
            "verdict": format!("{:?}", self.verdict).to_lowercase(),
        })
    }
}

/// What one measurement produced: table rows, its raw figures, notes, and
/// the samples it has for the plots.
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) rows: Vec<Row>,
    pub(crate) detail: serde_json::Map<String, Value>,
    pub(crate) notes: Vec<String>,
    pub(crate) samples: Samples,
}

/// The workspace's commit, `+dirty` with uncommitted changes: what was
/// measured.
pub(crate) fn commit() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match (git(&["rev-parse", "HEAD"]), git(&["status", "--porcelain"])) {
        (Some(head), Some(status)) if !status.is_empty() => format!("{head}+dirty"),
        (Some(head), _) => head,
        _ => "?".into(),
    }
}

pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Where the JSON and the plots go: `SPAMDELAY_BENCH_DIR` (set by `cargo
/// xtask bench`) or target/bench; created if missing.
pub(crate) fn bench_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("SPAMDELAY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub(crate) fn write_json(dir: &Path, doc: &Value, started: u64) -> Result<PathBuf> {
    let text = serde_json::to_string_pretty(doc)?;
    let path = dir.join(format!("bench-{started}.json"));
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let latest = dir.join("latest.json");
    std::fs::write(&latest, &text).with_context(|| format!("writing {}", latest.display()))?;
    Ok(path)
}

pub(crate) fn markdown(rows: &[Row]) -> String {
    let mut cells: Vec<[String; 6]> = vec![[
        "metric".into(),
        "A".into(),
        "B".into(),
        "ratio A/B min / median / max".into(),
        "target".into(),
        "verdict".into(),
    ]];
    for r in rows {
        let ratio = match r.ratio {
            Ratio::None => "—".to_string(),
            Ratio::Rounds(s) => format!("{:.3} / {:.3} / {:.3}", s.min, s.median, s.max),
            Ratio::Single(v) => format!("{v:.3} (of medians)"),
        };
        cells.push([
            r.metric.clone(),
            r.a.clone(),
            r.b.clone(),
            ratio,
            r.target.clone(),
            r.verdict.word().into(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |c: &[String; 6]| {
        let padded: Vec<String> = c
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s}{}", " ".repeat(w - s.chars().count())))
            .collect();
        format!("| {} |", padded.join(" | "))
    };
    let mut out = vec![line(&cells[0])];
    out.push(format!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    ));
    out.extend(cells[1..].iter().map(line));
    out.join("\n")
}
