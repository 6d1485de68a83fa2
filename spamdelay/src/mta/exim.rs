//! Exim: the connect ACL's `delay`, `smtp_enforce_sync`, and whether
//! PIPECONNECT is advertised, read from the configuration file (Exim's own
//! `-bP` needs its binary and privileges; the file is what the admin wrote).

use std::path::Path;

use anyhow::{Context, Result};

use super::{Mta, Pipeconnect, need, parse_time};
use crate::allow::Cidr;

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

/// The configuration file's text to the settings spamdelay follows.
pub fn from_text(text: &str) -> Mta {
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
    let (pipeconnect, not_followed) = host_list(&pipeconnect_hosts);
    if pipeconnect != Pipeconnect::Off {
        details.push(format!("PIPECONNECT advertised to {pipeconnect_hosts}"));
    }
    if !not_followed.is_empty() {
        details.push(format!(
            "PIPECONNECT list items spamdelay cannot evaluate, judged without it: {}",
            not_followed.join(" : ")
        ));
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

/// An Exim host list (`pipelining_connect_advertise_hosts`) as networks.
/// Exim takes the first item that matches; spamdelay's kernel takes the most
/// specific network, so a positive item is dropped where an earlier `!`
/// item covers it: the exemption is never wider than Exim's list. Items
/// that are not addresses, networks or `*` (host names, lookups, named
/// lists) are returned apart: their hosts get no exemption.
pub fn host_list(list: &str) -> (Pipeconnect, Vec<String>) {
    let list = list.trim();
    // `<;` (or another character) changes the separator; with the default
    // `:`, a doubled `::` is a colon inside an item (IPv6).
    let (sep, body) = match list.strip_prefix('<') {
        Some(rest) if !rest.is_empty() => {
            let sep = rest.chars().next().unwrap_or(':');
            (sep, &rest[sep.len_utf8()..])
        }
        _ => (':', list),
    };
    let items: Vec<String> = if sep == ':' {
        body.replace("::", "\u{0}")
            .split(':')
            .map(|i| i.replace('\u{0}', ":"))
            .collect()
    } else {
        body.split(sep).map(str::to_string).collect()
    };
    let mut nets: Vec<(Cidr, bool)> = Vec::new();
    let mut not_followed = Vec::new();
    for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        let (negated, rest) = match item.strip_prefix('!') {
            Some(r) => (true, r.trim()),
            None => (false, item),
        };
        let cidrs: Vec<Cidr> = if rest == "*" {
            ["0.0.0.0/0", "::/0"]
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect()
        } else if let Ok(c) = rest.parse::<Cidr>() {
            vec![c]
        } else {
            not_followed.push(item.to_string());
            continue;
        };
        for cidr in cidrs {
            let excluded = nets.iter().any(|(n, on)| !on && n.covers(&cidr));
            let known = nets.iter().any(|(n, _)| *n == cidr);
            if known || (!negated && excluded) {
                continue;
            }
            nets.push((cidr, !negated));
        }
    }
    let everyone = nets.len() == 2 && nets.iter().all(|(n, on)| *on && n.prefix_len() == 0);
    let pipeconnect = if everyone {
        Pipeconnect::All
    } else if nets.iter().any(|(_, on)| *on) {
        Pipeconnect::Hosts(nets)
    } else {
        Pipeconnect::Off
    };
    (pipeconnect, not_followed)
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
        assert_eq!(m.pipeconnect, Pipeconnect::All);
        assert_eq!(
            m.to_string(),
            "exim on port 25: connect delay 3s, smtp_enforce_sync true, PIPECONNECT advertised to *"
        );
    }

    #[test]
    fn pipeconnect_left_unset_is_advertised_to_all_as_in_exim() {
        assert_eq!(
            from_text("primary_hostname = mx.example\n").pipeconnect,
            Pipeconnect::All
        );
    }

    #[test]
    fn no_delay_and_no_pipeconnect() {
        let m = from_text(
            "acl_smtp_connect = c\nsmtp_enforce_sync = false\npipelining_connect_advertise_hosts =\nbegin acl\nc:\n  accept\n",
        );
        assert_eq!(m.greet_pause, None);
        assert_eq!(m.pipeconnect, Pipeconnect::Off);
        assert_eq!(
            m.to_string(),
            "exim on port 25: no connect delay, smtp_enforce_sync false"
        );
    }

    #[test]
    fn host_lists_become_networks() {
        let net = |s: &str| s.parse::<Cidr>().unwrap();
        assert_eq!(host_list("*").0, Pipeconnect::All);
        assert_eq!(host_list("").0, Pipeconnect::Off);
        assert_eq!(
            host_list("192.0.2.0/24 : 2001::db8::::/32 : 198.51.100.7"),
            (
                Pipeconnect::Hosts(vec![
                    (net("192.0.2.0/24"), true),
                    (net("2001:db8::/32"), true),
                    (net("198.51.100.7"), true),
                ]),
                vec![]
            )
        );
        assert_eq!(
            host_list("<; 2001:db8::1 ; !192.0.2.5 ; *").0,
            Pipeconnect::Hosts(vec![
                (net("2001:db8::1"), true),
                (net("192.0.2.5"), false),
                (net("0.0.0.0/0"), true),
                (net("::/0"), true),
            ])
        );
    }

    #[test]
    fn host_list_items_it_cannot_evaluate_get_no_exemption() {
        let (p, skipped) = host_list("mx.partner.example : +relay_hosts : 192.0.2.9");
        assert_eq!(
            p,
            Pipeconnect::Hosts(vec![("192.0.2.9".parse().unwrap(), true)])
        );
        assert_eq!(skipped, vec!["mx.partner.example", "+relay_hosts"]);
        // A later positive item inside an earlier exclusion stays excluded.
        let (p, _) = host_list("!192.0.2.0/24 : 192.0.2.9 : 198.51.100.0/24");
        assert_eq!(
            p,
            Pipeconnect::Hosts(vec![
                ("192.0.2.0/24".parse().unwrap(), false),
                ("198.51.100.0/24".parse().unwrap(), true),
            ])
        );
        assert_eq!(host_list("!*").0, Pipeconnect::Off);
    }
}
