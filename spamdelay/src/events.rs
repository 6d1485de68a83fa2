//! The ring buffer, turned into typed verdict reports and their log lines.

use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use spamdelay_common::{
    Event, Verdict,
    event::{HOW_FRAGMENT, HOW_SYN},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

/// One verdict about one client connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub verdict: Verdict,
    /// The MTA's greet pause, when known: QUIT lines and bans weigh by it.
    pub pause: Option<Duration>,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// From the handshake's completion to the verdict.
    pub after: Duration,
    /// New payload bytes the server accepted from the client's offending
    /// segment (EARLY-TALK, PIPECONNECT, PROBE).
    pub bytes: u32,
    /// Their first bytes, as captured by the kernel.
    pub payload: Vec<u8>,
    /// How they came: `HOW_FRAGMENT` (bytes counts the first fragment's
    /// share), `HOW_SYN` (TCP Fast Open).
    pub how: u8,
    /// PIPECONNECT: when the client passed before.
    pub passed_at: Option<SystemTime>,
}

impl Report {
    pub fn from_event(ev: &Event) -> Option<Self> {
        let captured = usize::from(ev.captured).min(ev.payload.len());
        Some(Report {
            verdict: Verdict::from_u8(ev.verdict)?,
            pause: None,
            client: ev.key.client_addr(),
            server: ev.key.server_addr(),
            after: Duration::from_nanos(ev.since_handshake_ns),
            bytes: ev.bytes,
            payload: ev.payload[..captured].to_vec(),
            how: ev.how,
            passed_at: (ev.verdict == Verdict::Pipeconnect as u8)
                .then(|| crate::clock::boot_to_wall(ev.passed_boot_ns)),
        })
    }

    /// `92 bytes`, `25 bytes in the SYN (TCP Fast Open)`, `a fragmented
    /// segment (25 bytes in its first fragment)`.
    fn amount(&self) -> String {
        if self.how & HOW_FRAGMENT != 0 {
            format!(
                "a fragmented segment ({} bytes in its first fragment)",
                self.bytes
            )
        } else if self.how & HOW_SYN != 0 {
            format!("{} bytes in the SYN (TCP Fast Open)", self.bytes)
        } else {
            format!("{} bytes", self.bytes)
        }
    }

    /// The escaped payload, with `...` when the kernel captured only its start.
    pub fn shown_payload(&self) -> String {
        let mut s = escape(&self.payload);
        if self.bytes as usize > self.payload.len() || self.how & HOW_FRAGMENT != 0 {
            s.push_str("...");
        }
        s
    }

    /// The verdict word that starts the log line.
    pub fn word(&self) -> &'static str {
        match self.verdict {
            Verdict::EarlyTalk => "EARLY-TALK",
            Verdict::Quit => "QUIT",
            Verdict::Pass => "PASS",
            Verdict::Pipeconnect => "PIPECONNECT",
            Verdict::Probe => "PROBE",
        }
    }
}

/// `[address]:port`, postscreen style, for both families.
pub struct Peer<'a>(pub &'a SocketAddr);

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]:{}", self.0.ip(), self.0.port())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let after = self.after.as_secs_f64();
        let (from, to) = (Peer(&self.client), Peer(&self.server));
        match self.verdict {
            Verdict::EarlyTalk | Verdict::Probe => write!(
                f,
                "{} {} after {after:.3}s from {from} to {to}: {}",
                self.word(),
                self.amount(),
                self.shown_payload()
            ),
            Verdict::Pipeconnect => {
                let passed = self.passed_at.map_or_else(
                    || "earlier".to_string(),
                    |t| humantime::format_rfc3339_seconds(t).to_string(),
                );
                write!(
                    f,
                    "PIPECONNECT {} after {after:.3}s from {from} to {to} (passed before at {passed}): {}",
                    self.amount(),
                    self.shown_payload()
                )
            }
            Verdict::Quit => match self.pause {
                Some(p) => write!(
                    f,
                    "QUIT after {after:.3}s of a {} greet pause from {from} to {to}",
                    crate::duration::show(p)
                ),
                None => write!(f, "QUIT after {after:.3}s from {from} to {to}"),
            },
            Verdict::Pass => write!(f, "PASS after {after:.3}s from {from} to {to}"),
        }
    }
}

/// Printable ASCII as is, everything else escaped, so a client's payload can
/// never forge or split a log line.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

/// Reads every event now in the ring buffer.
pub fn drain(ring: &mut RingBuf<MapData>) -> Vec<Report> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.extend(decode(&item));
    }
    out
}

/// One ring-buffer record as a report; `None` when it is too short for an
/// `Event` or its verdict is unknown.
pub fn decode(bytes: &[u8]) -> Option<Report> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // The ring buffer gives 8-byte aligned records, but do not rely on it.
    // SAFETY: the length is checked above, and `Event` is plain integers, so
    // any bytes are a valid one.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    Report::from_event(&ev)
}

/// Records the kernel writes without a wakeup (PASS, QUIT) are picked up
/// within this; EARLY-TALK wakes the reader at once.
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Forwards reports until the receiver is gone.
pub async fn forward(ring: RingBuf<MapData>, tx: mpsc::Sender<Report>) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so the
    // fd stays open for as long as it is registered.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reports = tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                // Cleared before draining: a record written meanwhile raises
                // a new edge instead of being left for the next tick.
                guard.clear_ready();
                drain(guard.get_inner_mut())
            }
            _ = tick.tick() => drain(fd.get_mut()),
        };
        for report in reports {
            if tx.send(report).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Forwards the kernel's debug records (aya-log) to the `log` crate, where
/// they show at debug level (`RUST_LOG=debug`).
pub async fn forward_kernel_log(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> std::io::Result<()> {
    // SAFETY: as for the verdict ring buffer: the logger owns its fd.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_log_lines_whole() {
        assert_eq!(escape(b"EHLO x\r\n"), "EHLO x\\r\\n");
        assert_eq!(escape(b"a\\b\x00\xff\x1b[2J"), "a\\\\b\\x00\\xff\\x1b[2J");
    }

    #[test]
    fn log_line_is_postscreen_like() {
        let r = Report {
            verdict: Verdict::EarlyTalk,
            pause: None,
            client: "198.51.100.11:40123".parse().unwrap(),
            server: "192.0.2.25:25".parse().unwrap(),
            after: Duration::from_millis(213),
            bytes: 8,
            payload: b"EHLO x\r\n".to_vec(),
            how: 0,
            passed_at: None,
        };
        assert_eq!(
            r.to_string(),
            "EARLY-TALK 8 bytes after 0.213s from [198.51.100.11]:40123 to [192.0.2.25]:25: EHLO x\\r\\n"
        );
        let q = Report {
            verdict: Verdict::Quit,
            client: "[2001:db8::10]:5000".parse().unwrap(),
            payload: vec![],
            bytes: 0,
            ..r
        };
        assert_eq!(
            q.to_string(),
            "QUIT after 0.213s from [2001:db8::10]:5000 to [192.0.2.25]:25"
        );
        let q = Report {
            pause: Some(Duration::from_secs(6)),
            ..q
        };
        assert_eq!(
            q.to_string(),
            "QUIT after 0.213s of a 6s greet pause from [2001:db8::10]:5000 to [192.0.2.25]:25"
        );
    }

    #[test]
    fn pipeconnect_probe_fragment_and_fast_open_lines() {
        let base = Report {
            verdict: Verdict::Pipeconnect,
            pause: None,
            client: "198.51.100.11:40123".parse().unwrap(),
            server: "192.0.2.25:25".parse().unwrap(),
            after: Duration::ZERO,
            bytes: 16,
            payload: b"EHLO c.example\r\n".to_vec(),
            how: HOW_SYN,
            passed_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000)),
        };
        assert_eq!(
            base.to_string(),
            "PIPECONNECT 16 bytes in the SYN (TCP Fast Open) after 0.000s from [198.51.100.11]:40123 to [192.0.2.25]:25 (passed before at 2026-11-30T00:53:20Z): EHLO c.example\\r\\n"
        );
        let probe = Report {
            verdict: Verdict::Probe,
            how: 0,
            passed_at: None,
            ..base.clone()
        };
        assert!(probe.to_string().starts_with("PROBE 16 bytes after "));
        let frag = Report {
            verdict: Verdict::EarlyTalk,
            how: HOW_FRAGMENT,
            payload: b"EHLO".to_vec(),
            bytes: 4,
            ..base
        };
        assert_eq!(
            frag.to_string(),
            "EARLY-TALK a fragmented segment (4 bytes in its first fragment) after 0.000s from [198.51.100.11]:40123 to [192.0.2.25]:25: EHLO..."
        );
    }
}
