//! Postfix: is postscreen in master.cf, and with what greet wait, teaser and
//! greet action? Read with `postconf -c DIR` where it is installed, else from
//! main.cf and master.cf directly, with Postfix's own defaults; `$name` and
//! `${name?{a}:{b}}` are evaluated as Postfix does when not under stress.

use std::{collections::HashMap, path::Path, process::Command};

use anyhow::{Context, Result};

use super::{Mta, need, parse_time};

pub const DEFAULT_DIR: &str = "/etc/postfix";

/// Postfix 3.7's defaults for what spamdelay reads.
const DEFAULTS: &[(&str, &str)] = &[
    ("postscreen_greet_wait", "${stress?{2}:{6}}s"),
    ("postscreen_greet_banner", "$smtpd_banner"),
    ("postscreen_greet_action", "ignore"),
    ("smtpd_banner", "$myhostname ESMTP $mail_name"),
    ("mail_name", "Postfix"),
    ("inet_interfaces", "all"),
    // Empty unless Postfix runs under stress.
    ("stress", ""),
];

pub fn read(dir: &Path) -> Result<Mta> {
    let main_cf = need(dir.join("main.cf"), "Postfix's main.cf")?;
    // `postconf` where installed: what the admin set (`-n`), the services (`-M`).
    let main = match postconf(dir, "-n") {
        Some(text) => text,
        None => std::fs::read_to_string(&main_cf)
            .with_context(|| format!("reading {}", main_cf.display()))?,
    };
    let master = match postconf(dir, "-M") {
        Some(text) => text,
        None => {
            let path = need(dir.join("master.cf"), "Postfix's master.cf")?;
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    let Some(mta) = from_text(&main, &master) else {
        anyhow::bail!(
            "no inet smtpd or postscreen service in {}/master.cf",
            dir.display()
        );
    };
    Ok(mta)
}

/// `postconf -c DIR FLAG`'s output, or `None` where it cannot run.
fn postconf(dir: &Path, flag: &str) -> Option<String> {
    let out = Command::new("postconf")
        .arg("-c")
        .arg(dir)
        .arg(flag)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// main.cf's and master.cf's text to the settings spamdelay follows; `None`
/// when master.cf has no inet smtpd or postscreen service.
pub fn from_text(main_cf: &str, master_cf: &str) -> Option<Mta> {
    let params = Params::new(main_cf);
    let services = master_services(master_cf);
    let postscreen = services
        .iter()
        .find(|s| s.kind == "inet" && s.command == "postscreen");
    let smtpd = services
        .iter()
        .find(|s| s.kind == "inet" && s.command == "smtpd");
    let service = postscreen.or(smtpd)?;
    let listen = listen(&service.name, &params.get("inet_interfaces"));
    let mut mta = Mta {
        name: String::new(),
        listen,
        greet_pause: None,
        pipeconnect: super::Pipeconnect::Off,
        details: Vec::new(),
        pause_word: "greet wait",
        how_to_pause: "run postscreen for port 25 in master.cf and set postscreen_greet_wait (e.g. 6s) with postscreen_greet_action = enforce",
    };
    if postscreen.is_some() {
        mta.name = "postfix postscreen".into();
        mta.greet_pause = parse_time(&params.get("postscreen_greet_wait"), 1);
        let banner = params.get("postscreen_greet_banner");
        mta.details.push(format!(
            "teaser banner {}",
            if banner.trim().is_empty() {
                "off"
            } else {
                "on"
            }
        ));
        mta.details.push(format!(
            "greet action {}",
            params.get("postscreen_greet_action").trim()
        ));
    } else {
        mta.name = "postfix smtpd".into();
    }
    Some(mta)
}

/// `[192.0.2.25]:25` when Postfix listens on one address, `port 25` else.
fn listen(service: &str, interfaces: &str) -> String {
    let (host, port) = match service.rsplit_once(':') {
        Some((h, p)) => (Some(h.trim_matches(['[', ']']).to_string()), p),
        None => (None, service),
    };
    let port = match port {
        "smtp" => "25",
        "submission" => "587",
        p => p,
    };
    let first = interfaces
        .split([',', ' '])
        .map(|s| s.trim_matches(['[', ']']))
        .find(|s| !s.is_empty());
    match host.or_else(|| first.filter(|f| *f != "all").map(str::to_string)) {
        Some(h) => format!("[{h}]:{port}"),
        None => format!("port {port}"),
    }
}

struct Params {
    raw: HashMap<String, String>,
}

/// References one `get` may expand, and the longest value it may build.
/// Postfix refuses a parameter that refers to itself; here a loop, or a
/// chain of parameters each naming the next several times (exponential),
/// makes the value unknown instead of hanging the daemon's start.
const MAX_REFERENCES: usize = 10_000;
const MAX_VALUE_LEN: usize = 64 * 1024;

impl Params {
    /// main.cf's settings over Postfix's defaults.
    fn new(main_cf: &str) -> Self {
        let mut raw: HashMap<String, String> = DEFAULTS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        raw.extend(parse_main_cf(main_cf));
        Params { raw }
    }

    /// A parameter's value with `$name` references evaluated; empty (unknown)
    /// when that takes more than `MAX_REFERENCES` or `MAX_VALUE_LEN`.
    fn get(&self, name: &str) -> String {
        let mut budget = MAX_REFERENCES;
        let value = self.expand(
            self.raw.get(name).map(String::as_str).unwrap_or(""),
            0,
            &mut budget,
        );
        if budget == 0 { String::new() } else { value }
    }

    fn expand(&self, value: &str, depth: usize, budget: &mut usize) -> String {
        if depth > 16 {
            return value.to_string();
        }
        let mut out = String::new();
        let mut rest = value;
        while let Some(i) = rest.find('$') {
            if *budget == 0 || out.len() > MAX_VALUE_LEN {
                *budget = 0;
                return out;
            }
            *budget -= 1;
            out.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            if let Some(inner) = rest.strip_prefix('{') {
                let end = matching_brace(inner).unwrap_or(inner.len());
                out.push_str(&self.conditional(&inner[..end], depth, budget));
                rest = inner.get(end + 1..).unwrap_or("");
            } else {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let name = &rest[..end];
                out.push_str(&self.expand(
                    self.raw.get(name).map(String::as_str).unwrap_or(""),
                    depth + 1,
                    budget,
                ));
                rest = &rest[end..];
            }
        }
        out.push_str(rest);
        out
    }

    /// `name`, `name?{a}:{b}`, `name?a`, `name:b` (the part inside `${...}`).
    fn conditional(&self, expr: &str, depth: usize, budget: &mut usize) -> String {
        let Some(op) = expr.find(['?', ':']) else {
            return self.expand(&format!("${expr}"), depth + 1, budget);
        };
        let name = &expr[..op];
        let set = !self
            .expand(
                self.raw.get(name).map(String::as_str).unwrap_or(""),
                depth + 1,
                budget,
            )
            .is_empty();
        let strip = |s: &str| {
            s.trim()
                .trim_start_matches('{')
                .trim_end_matches('}')
                .to_string()
        };
        let (if_set, if_unset) = if &expr[op..op + 1] == "?" {
            match split_top(&expr[op + 1..]) {
                (a, Some(b)) => (strip(a), strip(b)),
                (a, None) => (strip(a), String::new()),
            }
        } else {
            (String::new(), strip(&expr[op + 1..]))
        };
        self.expand(if set { &if_set } else { &if_unset }, depth + 1, budget)
    }
}

/// Index of the `}` closing an already opened brace.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 1;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `{a}:{b}` split at the top-level colon.
fn split_top(s: &str) -> (&str, Option<&str>) {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ':' if depth == 0 => return (&s[..i], Some(&s[i + 1..])),
            _ => {}
        }
    }
    (s, None)
}

/// `name = value` lines with indented continuations; comments dropped.
fn parse_main_cf(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

struct Service {
    name: String,
    kind: String,
    command: String,
}

/// master.cf's services (in `postconf -M`'s output or the file itself).
fn master_services(text: &str) -> Vec<Service> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.starts_with([' ', '\t']))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8).then(|| Service {
                name: f[0].into(),
                kind: f[1].into(),
                command: f[7].into(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greet_wait_default_is_six_seconds_when_not_under_stress() {
        assert_eq!(Params::new("").get("postscreen_greet_wait"), "6s");
        assert_eq!(
            Params::new("stress = yes").get("postscreen_greet_wait"),
            "2s"
        );
        assert_eq!(
            Params::new("postscreen_greet_wait = ${stress?{1}:{3}}s").get("postscreen_greet_wait"),
            "3s"
        );
    }

    #[test]
    fn references_and_continuations_expand() {
        let p = Params::new(
            "myhostname = mx.example\nsmtpd_banner = $myhostname\n  ESMTP ${mail_name}\n",
        );
        assert_eq!(p.get("smtpd_banner"), "mx.example ESMTP Postfix");
        assert_eq!(p.get("postscreen_greet_banner"), "mx.example ESMTP Postfix");
    }

    #[test]
    fn references_without_end_make_the_value_unknown() {
        // 4^16 expansions if followed to the depth limit.
        let p = Params::new(
            "myhostname = $myhostname$myhostname$myhostname$myhostname\nsmtpd_banner = $myhostname\n",
        );
        assert_eq!(p.get("postscreen_greet_banner"), "");
        assert_eq!(Params::new("a = x\nb = $a$a\n").get("b"), "xx");
    }

    #[test]
    fn listen_address_comes_from_the_service_or_interfaces() {
        assert_eq!(listen("smtp", "all"), "port 25");
        assert_eq!(
            listen("smtp", "192.0.2.25, [2001:db8::25]"),
            "[192.0.2.25]:25"
        );
        assert_eq!(listen("[2001:db8::25]:smtp", "all"), "[2001:db8::25]:25");
        assert_eq!(listen("2525", "all"), "port 2525");
    }

    #[test]
    fn postscreen_is_found_in_master_cf() {
        let dir = std::env::temp_dir().join(format!("spamdelay-postfix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("main.cf"), "postscreen_greet_wait = 3s\npostscreen_greet_action = enforce\ninet_interfaces = 192.0.2.25\n").unwrap();
        std::fs::write(
            dir.join("master.cf"),
            "# comment\nsmtp      inet  n       -       y       -       1       postscreen\nsmtpd     pass  -       -       y       -       -       smtpd\n",
        )
        .unwrap();
        let mta = read(&dir).unwrap();
        assert_eq!(
            mta.to_string(),
            "postfix postscreen on [192.0.2.25]:25: greet wait 3s, teaser banner on, greet action enforce"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
