//! Exim: the connect ACL's `delay`, `smtp_enforce_sync`, and whether
//! PIPECONNECT is advertised, read from the configuration file (Exim's own
//! `-bP` needs its binary and privileges; the file is what the admin wrote).

use std::path::Path;

use anyhow::{Context, Result};

use super::{Mta, need, parse_time};

pub const DEFAULT_CONFIG: &str = "/etc/exim4/exim4.conf";

pub fn read(file: &Path) -> Result<Mta> {
    let file = need(file.to_path_buf(), "Exim's configuration")?;
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(from_text(&text))
}

/// Logical lines: comments dropped, backslash continuations joined.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.starts_with('#') || t.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            continue;
        }
        cur.push_str(t);
        out.push(std::mem::take(&mut cur));
    }
    out
}

fn from_text(text: &str) -> Mta {
    let lines = logical_lines(text);
    let section_start = |name: &str| lines.iter().position(|l| l == &format!("begin {name}"));
    let main_end = lines
        .iter()
        .position(|l| l.starts_with("begin "))
        .unwrap_or(lines.len());
    let option = |name: &str| {
        lines[..main_end].iter().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let port = option("daemon_smtp_ports")
        .or_else(|| option("daemon_smtp_port"))
        .unwrap_or_else(|| "25".into());
    let port = port
        .split([':', ' '])
        .next()
        .unwrap_or("25")
        .replace("smtp", "25");
    let enforce_sync =
        option("smtp_enforce_sync").is_none_or(|v| !matches!(v.as_str(), "false" | "no"));
    // Unset, Exim 4.96 advertises PIPECONNECT to every host (`exim -bP` says `*`).
    let pipeconnect_hosts =
        option("pipelining_connect_advertise_hosts").unwrap_or_else(|| "*".into());
    let mut delay = None;
    if let (Some(acl), Some(start)) = (option("acl_smtp_connect"), section_start("acl")) {
        let body = lines[start + 1..]
            .iter()
            .skip_while(|l| l.trim_end_matches(':') != acl || !l.ends_with(':'))
            .skip(1)
            .take_while(|l| !l.starts_with("begin ") && (!l.ends_with(':') || l.contains(' ')));
        for l in body {
            if let Some(v) = l
                .split_once("delay")
                .and_then(|(_, rest)| rest.trim_start().strip_prefix('='))
            {
                delay = parse_time(v.split_whitespace().next().unwrap_or(""), 1);
            }
        }
    }
    let mut details = vec![format!("smtp_enforce_sync {enforce_sync}")];
    let pipeconnect = !pipeconnect_hosts.is_empty();
    if pipeconnect {
        details.push(format!("PIPECONNECT advertised to {pipeconnect_hosts}"));
    }
    Mta {
        name: "exim".into(),
        listen: format!("port {port}"),
        greet_pause: delay,
        pipeconnect,
        details,
        pause_word: "connect delay",
        how_to_pause: "add `accept delay = 6s` to the ACL named by acl_smtp_connect",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "\
# main
primary_hostname = mx.example
acl_smtp_connect = acl_check_connect
pipelining_connect_advertise_hosts = *
host_lookup =

begin acl

acl_check_connect:
  accept delay = 3s

acl_check_rcpt:
  accept

begin routers
";

    #[test]
    fn connect_delay_and_pipeconnect_are_read() {
        let m = from_text(CONF);
        assert_eq!(m.greet_pause, Some(std::time::Duration::from_secs(3)));
        assert!(m.pipeconnect);
        assert_eq!(
            m.to_string(),
            "exim on port 25: connect delay 3s, smtp_enforce_sync true, PIPECONNECT advertised to *"
        );
    }

    #[test]
    fn pipeconnect_left_unset_is_advertised_to_all_as_in_exim() {
        assert!(from_text("primary_hostname = mx.example\n").pipeconnect);
    }

    #[test]
    fn no_delay_and_no_pipeconnect() {
        let m = from_text(
            "acl_smtp_connect = c\nsmtp_enforce_sync = false\npipelining_connect_advertise_hosts =\nbegin acl\nc:\n  accept\n",
        );
        assert_eq!(m.greet_pause, None);
        assert!(!m.pipeconnect);
        assert_eq!(
            m.to_string(),
            "exim on port 25: no connect delay, smtp_enforce_sync false"
        );
    }
}
