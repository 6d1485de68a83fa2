//! What the MTA beside spamdelay is configured to do: its greet pause, its
//! teaser, PIPECONNECT. One file per MTA reads its configuration; `detect`
//! picks the MTA (`--mta`, `--mta-config`) and the daemon logs the finding.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Result, bail};

use crate::allow::Cidr;

pub mod exim;
pub mod postfix;
pub mod sendmail;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MtaKind {
    /// The first of Postfix, Exim, Sendmail whose configuration is found.
    Auto,
    Postfix,
    Exim,
    Sendmail,
    /// Do not look.
    None,
}

/// To whom an MTA advertises PIPECONNECT.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Pipeconnect {
    #[default]
    Off,
    All,
    /// Networks in the MTA's host list, each advertised to (`true`) or
    /// excluded (`false`, a `!` item). The most specific network decides.
    Hosts(Vec<(Cidr, bool)>),
}

/// An MTA's settings that matter to spamdelay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mta {
    /// `postfix postscreen`, `postfix smtpd`, `exim`, `sendmail`.
    pub name: String,
    /// `[192.0.2.25]:25` or `port 25`.
    pub listen: String,
    pub greet_pause: Option<Duration>,
    /// To whom the MTA advertises PIPECONNECT: those clients may talk ahead
    /// of the banner once they have seen it advertised.
    pub pipeconnect: Pipeconnect,
    /// What else was found, for the log line (`teaser banner on`, ...).
    pub details: Vec<String>,
    /// What the pause is called in this MTA's terms (`greet wait`, ...).
    pub pause_word: &'static str,
    /// How to add a pause, for the warning when there is none.
    pub how_to_pause: &'static str,
}

impl fmt::Display for Mta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}: ", self.name, self.listen)?;
        match self.greet_pause {
            Some(p) => write!(f, "{} {}", self.pause_word, crate::duration::show(p))?,
            None => write!(f, "no {}", self.pause_word)?,
        }
        for d in &self.details {
            write!(f, ", {d}")?;
        }
        Ok(())
    }
}

/// Finds the MTA's settings. `Ok(None)` when there is nothing to read
/// (`--mta none`, or `auto` finding no configuration).
pub fn detect(kind: MtaKind, config: Option<&Path>) -> Result<Option<Mta>> {
    let kind = match (kind, config) {
        (MtaKind::None, _) => return Ok(None),
        (MtaKind::Auto, Some(path)) => guess(path),
        (MtaKind::Auto, None) => {
            let found = [
                (MtaKind::Postfix, "/etc/postfix/main.cf"),
                (MtaKind::Exim, exim::DEFAULT_CONFIG),
                (MtaKind::Sendmail, sendmail::DEFAULT_CF),
            ]
            .into_iter()
            .find(|(_, p)| Path::new(p).exists());
            let Some((kind, _)) = found else {
                return Ok(None);
            };
            // Looking was not asked for: a configuration that cannot be read
            // is reported, not fatal.
            return match detect(kind, None) {
                Ok(m) => Ok(m),
                Err(e) => {
                    log::warn!("found a {kind:?} configuration but could not read it: {e:#}");
                    Ok(None)
                }
            };
        }
        (k, _) => k,
    };
    let mta = match kind {
        MtaKind::Postfix => postfix::read(config.unwrap_or(Path::new(postfix::DEFAULT_DIR)))?,
        MtaKind::Exim => exim::read(config.unwrap_or(Path::new(exim::DEFAULT_CONFIG)))?,
        MtaKind::Sendmail => sendmail::read(config.unwrap_or(Path::new(sendmail::DEFAULT_CF)))?,
        MtaKind::Auto | MtaKind::None => bail!("no MTA kind to read"),
    };
    Ok(Some(mta))
}

/// Which MTA a `--mta-config` path belongs to.
fn guess(path: &Path) -> MtaKind {
    if path.is_dir() || path.join("main.cf").exists() {
        MtaKind::Postfix
    } else if path.extension().is_some_and(|e| e == "cf") {
        MtaKind::Sendmail
    } else {
        MtaKind::Exim
    }
}

/// `DIR/NAME`, or a clear error naming the flag when it is not there.
pub(crate) fn need(path: PathBuf, what: &str) -> Result<PathBuf> {
    if !path.exists() {
        bail!(
            "{what} {} not found: point --mta-config at it, or use --mta none",
            path.display()
        );
    }
    Ok(path)
}

/// `3s`, `1m30s`, `2m`, `1h`, a bare number of `default_unit`s: the time
/// syntax Postfix and Exim share. `None` for what is not a time, or more
/// seconds than a u64 holds.
pub fn parse_time(value: &str, default_unit: u64) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    if !num.is_empty() {
        let n: u64 = num.parse().ok()?;
        total = total.checked_add(n.checked_mul(default_unit)?)?;
    }
    Some(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_mta_syntax() {
        assert_eq!(parse_time("6s", 1), Some(Duration::from_secs(6)));
        assert_eq!(parse_time("1m30s", 1), Some(Duration::from_secs(90)));
        assert_eq!(parse_time("3", 1), Some(Duration::from_secs(3)));
        assert_eq!(parse_time("x", 1), None);
        assert_eq!(parse_time("", 1), None);
        // Found by `cargo xtask fuzz` (exim): this overflowed.
        assert_eq!(parse_time("2222222222222222d", 1), None);
        assert_eq!(
            parse_time("18446744073709551615", 1),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_time("18446744073709551615s1s", 1), None);
    }
}
