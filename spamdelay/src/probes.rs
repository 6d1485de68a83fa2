//! Benign probes: early talk that is exactly one of these is logged as
//! PROBE and never banned. Thunderbird's account setup connects and says
//! `EHLO we-guess.mozilla.org` at once, then quits on the first reply; the
//! kernel follows the flow on, so anything more before the greeting is
//! still early talk.

use std::{fmt, str::FromStr};

use spamdelay_common::PAYLOAD_CAPTURE;

/// The probes known by default (`--no-default-probes` drops them).
pub const DEFAULT_PROBES: &[&str] = &["EHLO we-guess.mozilla.org"];

/// One probe's exact bytes, CRLF included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe(Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum BadProbe {
    #[error("empty benign probe: give the client's line, e.g. 'EHLO we-guess.mozilla.org'")]
    Empty,
    #[error(
        "benign probe '{0}' is {1} bytes with its CRLF; at most {PAYLOAD_CAPTURE} can be matched"
    )]
    TooLong(String, usize),
    #[error("benign probe '{0}': bad escape (use \\r, \\n, \\t, \\\\ or \\xHH)")]
    BadEscape(String),
}

impl FromStr for Probe {
    type Err = BadProbe;

    /// The line as the client sends it, without its CRLF (added when the
    /// text does not end in `\n`); `\r`, `\n`, `\t`, `\\`, `\xHH` escapes
    /// as in spamdelay's log lines.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut out = Vec::with_capacity(text.len() + 2);
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            match chars.next() {
                Some('r') => out.push(b'\r'),
                Some('n') => out.push(b'\n'),
                Some('t') => out.push(b'\t'),
                Some('\\') => out.push(b'\\'),
                Some('x') => {
                    let hex: String = chars.by_ref().take(2).collect();
                    // Two hex digits exactly: from_str_radix alone takes `+f`.
                    let byte = u8::from_str_radix(&hex, 16)
                        .ok()
                        .filter(|_| hex.len() == 2 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                        .ok_or_else(|| BadProbe::BadEscape(text.to_string()))?;
                    out.push(byte);
                }
                _ => return Err(BadProbe::BadEscape(text.to_string())),
            }
        }
        if out.is_empty() {
            return Err(BadProbe::Empty);
        }
        if out.last() != Some(&b'\n') {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() > PAYLOAD_CAPTURE {
            return Err(BadProbe::TooLong(text.to_string(), out.len()));
        }
        Ok(Probe(out))
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::events::escape(&self.0))
    }
}

impl Probe {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The probes in force: the defaults unless dropped, then the admin's.
pub fn effective(extra: &[Probe], no_defaults: bool) -> Vec<Probe> {
    let mut all: Vec<Probe> = if no_defaults {
        Vec::new()
    } else {
        DEFAULT_PROBES
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    for p in extra {
        if !all.contains(p) {
            all.push(p.clone());
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_is_the_line_with_its_crlf() {
        let p: Probe = "EHLO we-guess.mozilla.org".parse().unwrap();
        assert_eq!(p.bytes(), b"EHLO we-guess.mozilla.org\r\n");
        assert_eq!(p.to_string(), "EHLO we-guess.mozilla.org\\r\\n");
        let two: Probe = "EHLO a\\r\\nQUIT\\r\\n".parse().unwrap();
        assert_eq!(two.bytes(), b"EHLO a\r\nQUIT\r\n");
        let hex: Probe = "X\\x00".parse().unwrap();
        assert_eq!(hex.bytes(), b"X\x00\r\n");
    }

    #[test]
    fn bad_probes_are_refused_with_the_reason() {
        assert!(matches!("".parse::<Probe>(), Err(BadProbe::Empty)));
        assert!(matches!(
            "a\\q".parse::<Probe>(),
            Err(BadProbe::BadEscape(_))
        ));
        assert!(matches!(
            "a\\x4".parse::<Probe>(),
            Err(BadProbe::BadEscape(_))
        ));
        assert!(matches!(
            "a\\x+f".parse::<Probe>(),
            Err(BadProbe::BadEscape(_))
        ));
        let long = "x".repeat(63);
        assert!(matches!(
            long.parse::<Probe>(),
            Err(BadProbe::TooLong(_, 65))
        ));
    }

    #[test]
    fn defaults_can_be_dropped_and_extended() {
        let extra: Probe = "EHLO probe.example".parse().unwrap();
        let all = effective(std::slice::from_ref(&extra), false);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].bytes(), b"EHLO we-guess.mozilla.org\r\n");
        assert_eq!(effective(std::slice::from_ref(&extra), true), vec![extra]);
    }
}
