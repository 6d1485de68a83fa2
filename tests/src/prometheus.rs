//! A real Prometheus (Debian's `prometheus`) run in a lab namespace to scrape
//! the daemon, `promtool check metrics`, and the metric names a PromQL query
//! or an exposition holds. Plain HTTP from inside a namespace is in
//! `crate::http` (`get` and `encode` are re-exported here).

use std::{
    collections::BTreeSet,
    io::Write,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

pub use crate::http::{encode, get};
use crate::{Watched, lab::Netns};

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// A loopback port nobody listens on in `ns`.
pub fn free_port(ns: &Netns) -> Result<u16> {
    ns.run(|| -> Result<u16> { Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) })?
}

/// A Prometheus server scraping `target` every second, in a namespace,
/// with its configuration and storage in a directory of its own. Killed on
/// drop.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Watched<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(ns: &Netns, target: SocketAddr) -> Result<Self> {
        let dir = tempfile::tempdir().context("creating Prometheus's directory")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: spamdelay\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .context("writing prometheus.yml")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port(ns)?));
        let mut child = ns
            .command(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting prometheus (Debian package prometheus)")?;
        let log: Arc<Watched<Vec<String>>> = Arc::default();
        let sink = log.clone();
        crate::read_lines(&mut child, move |line, _| {
            sink.update(|lines| lines.push(line))
        });
        let mut p = Prometheus {
            child,
            addr,
            log,
            _dir: dir,
        };
        let ready = crate::until(Duration::from_secs(30), || {
            matches!(get(ns, addr, "/-/ready"), Ok((200, _)))
        });
        if !ready {
            let status = p.child.try_wait().ok().flatten();
            bail!(
                "prometheus was not ready within 30 s (exit {status:?}): {:#?}",
                p.lines()
            );
        }
        Ok(p)
    }

    /// What Prometheus logged.
    pub fn lines(&self) -> Vec<String> {
        self.log.read(Vec::clone)
    }

    /// `/api/v1/query?query=EXPR`: the JSON answer, whatever its status.
    pub fn query(&self, ns: &Netns, expr: &str) -> Result<serde_json::Value> {
        let (_, body) = get(
            ns,
            self.addr,
            &format!("/api/v1/query?query={}", encode(expr)),
        )?;
        serde_json::from_str(&body).with_context(|| format!("Prometheus answered {body:?}"))
    }

    /// The value of the single series `expr` selects, if it has exactly one.
    pub fn value(&self, ns: &Netns, expr: &str) -> Result<Option<f64>> {
        let answer = self.query(ns, expr)?;
        if answer["status"] != "success" {
            bail!("query {expr}: {answer}");
        }
        let result = answer["data"]["result"]
            .as_array()
            .with_context(|| format!("query {expr}: no result in {answer}"))?;
        let [one] = result.as_slice() else {
            return Ok(None);
        };
        Ok(one["value"][1].as_str().and_then(|v| v.parse().ok()))
    }

    /// SIGTERM, then the exit.
    pub fn stop(mut self) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        let done = crate::until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !done {
            bail!("prometheus still ran 10 s after SIGTERM");
        }
        Ok(())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `promtool check metrics` on an exposition: its complaints, if any.
pub fn promtool_check(exposition: &str) -> Result<()> {
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian package prometheus)")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// An exposition's metric families (`# TYPE` lines): name and type.
pub fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// Whether a query's metric `name` is in the exposition: a family's name,
/// or a histogram's `_bucket`, `_sum` or `_count` series.
pub fn exported(families: &[(String, String)], name: &str) -> bool {
    families.iter().any(|(n, _)| n == name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| families.iter().any(|(n, t)| n == base && t == "histogram"))
        })
}

/// Words of PromQL that are no metric, where not followed by `(`: among
/// them the aggregations, which may put their `by (...)` before the `(`.
const KEYWORDS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// The metric names a PromQL query reads: its identifiers, less function
/// and aggregation names (followed by `(`), keywords with their label lists
/// (`by (le)`), label matchers (`{...}`), ranges (`[5m]`), strings and
/// numbers.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: usize, close: char| {
        chars[i..]
            .iter()
            .position(|&c| c == close)
            .map_or(chars.len(), |p| i + p + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '"' | '\'' | '`' => i = skip_to(i + 1, c),
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | '_'))
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let call = chars.get(next) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if KEYWORDS.contains(&lower.as_str()) {
                    // `by (le)`, `on (instance, job)`: labels, not metrics.
                    if call
                        && matches!(
                            lower.as_str(),
                            "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                        )
                    {
                        i = skip_to(next + 1, ')');
                    }
                } else if !call {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Every PromQL query of a Grafana dashboard: its panels' (rows' panels
/// too) targets' `expr`.
pub fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<String>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(e.to_string());
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A dashboard query as Grafana would send it: its variables replaced
/// (`$__rate_interval`, `$__range`: 1m; `$instance` and the like: `.*`).
pub fn as_sent(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = match after.strip_prefix('{') {
            Some(braced) => match braced.split_once('}') {
                Some((n, t)) => (n, t),
                None => (braced, ""),
            },
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        out.push_str(if name.starts_with("__") { "1m" } else { ".*" });
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// The dashboard file shipped in `dist/grafana/`.
pub fn dashboard_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana/spamdelay.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_leave_functions_labels_and_ranges_out() {
        let names = metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(spamdelay_apply_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval])))"#,
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["spamdelay_apply_duration_seconds_bucket"]
        );
        let names = metric_names(
            r#"max(spamdelay_set_elements{set="x"} / on (instance, job) group_left spamdelay_set_capacity) > 1e-3"#,
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["spamdelay_set_capacity", "spamdelay_set_elements"]
        );
        let names = metric_names(r#"sum by (verdict) (rate(spamdelay_verdicts_total[5m]))"#);
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["spamdelay_verdicts_total"]
        );
    }

    #[test]
    fn variables_are_replaced_as_grafana_would() {
        assert_eq!(
            as_sent(r#"rate(x{instance=~"$instance"}[$__rate_interval]) + y[${__range}]"#),
            r#"rate(x{instance=~".*"}[1m]) + y[1m]"#
        );
    }

    #[test]
    fn histogram_series_belong_to_their_family() {
        let f = families(
            "# TYPE a_seconds histogram\na_seconds_bucket{le=\"1\"} 0\n# TYPE b gauge\nb 1\n",
        );
        assert!(exported(&f, "a_seconds_bucket"));
        assert!(exported(&f, "b"));
        assert!(!exported(&f, "b_sum"));
        assert!(!exported(&f, "c"));
    }
}
