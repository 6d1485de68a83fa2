//! Sendmail: `FEATURE(greet_pause, N)` as compiled into sendmail.cf (the
//! `greet_pause` ruleset's default), and the `GreetPause:` entries of the
//! access map's text source.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};

use super::{Mta, need};

pub const DEFAULT_CF: &str = "/etc/mail/sendmail.cf";

pub fn read(cf: &Path) -> Result<Mta> {
    let cf = need(cf.to_path_buf(), "sendmail.cf")?;
    let text = std::fs::read_to_string(&cf).with_context(|| format!("reading {}", cf.display()))?;
    Ok(from_text(&text, |source| {
        std::fs::read_to_string(source).ok()
    }))
}

/// sendmail.cf's text to the settings spamdelay follows. `read_source` reads
/// the access map's text source (a path named in the .cf), when it can.
pub fn from_text(text: &str, read_source: impl FnOnce(&str) -> Option<String>) -> Mta {
    let (pause, access) = from_cf(text);
    let mut details = Vec::new();
    if let Some(path) = access {
        // The map's text source sits beside its .db.
        let source = path.trim_end_matches(".db");
        if let Some(entries) = read_source(source) {
            let n = entries
                .lines()
                .filter(|l| l.trim_start().starts_with("GreetPause:"))
                .count();
            details.push(format!("{n} GreetPause: entries in {source}"));
        }
    }
    let port = daemon_port(text);
    Mta {
        name: "sendmail".into(),
        listen: format!("port {port}"),
        greet_pause: pause,
        pipeconnect: super::Pipeconnect::Off,
        details,
        pause_word: "greet pause",
        how_to_pause: "add FEATURE(`greet_pause', 6000) to the .mc file (needs FEATURE(`access_db')) and rebuild sendmail.cf",
    }
}

/// The greet_pause ruleset's default (`$# 3000`, in ms) and the access map path.
fn from_cf(text: &str) -> (Option<Duration>, Option<String>) {
    let mut pause = None;
    let mut in_ruleset = false;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('S') {
            in_ruleset = name.trim() == "greet_pause";
            continue;
        }
        let default_ms = line
            .rsplit_once("$#")
            .and_then(|(_, v)| v.trim().parse::<u64>().ok());
        if in_ruleset
            && line.starts_with('R')
            && let Some(ms) = default_ms
        {
            pause = Some(Duration::from_millis(ms));
        }
    }
    let access = text
        .lines()
        .find(|l| l.starts_with("Kaccess "))
        .and_then(|l| l.split_whitespace().last())
        .map(str::to_string);
    (pause, access)
}

fn daemon_port(text: &str) -> String {
    text.lines()
        .filter_map(|l| l.strip_prefix("O DaemonPortOptions="))
        .flat_map(|opts| opts.split(','))
        .find_map(|kv| kv.trim().strip_prefix("Port=").map(str::to_string))
        .map(|p| if p == "smtp" { "25".to_string() } else { p })
        .unwrap_or_else(|| "25".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greet_pause_default_is_read_from_the_ruleset() {
        let cf = "Kaccess hash -T<TMPF> -o /etc/mail/access.db\nO DaemonPortOptions=Family=inet, Name=MTA-v4, Port=smtp, Addr=192.0.2.25\nSgreet_pause\nR$*\t\t\t$: <$1><?> $| $>\"Local_greet_pause\" $1\nR<?> <$*>\t\t$# 3000\nSnext\nR$*  $# 1\n";
        let (pause, access) = from_cf(cf);
        assert_eq!(pause, Some(Duration::from_secs(3)));
        assert_eq!(access.as_deref(), Some("/etc/mail/access.db"));
        assert_eq!(daemon_port(cf), "25");
        assert_eq!(from_cf("Sother\nR$* $# 5\n").0, None);
    }
}
