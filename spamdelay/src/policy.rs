//! From verdict to sentence: which network a verdict implicates, for how
//! long it is banned, and how repeat offences lengthen the ban.

use std::{net::IpAddr, time::Duration};

use spamdelay_common::Verdict;

use crate::{allow::Cidr, bans::Ban, events::Report};

#[derive(Clone, Debug)]
pub struct Policy {
    /// First offence.
    pub ban_time: Duration,
    /// Ceiling for repeat offences.
    pub max_ban_time: Duration,
    /// Ban QUIT verdicts too (off by default: a hang-up is weak evidence).
    pub ban_quitters: bool,
    /// IPv6 prefix banned around an offender (128: the address alone).
    pub ipv6_prefix: u8,
    /// How long offences are remembered after the ban ends.
    pub remember: Duration,
    /// The MTA's greet pause, when known: only quitters that gave up before
    /// it ended are banned.
    pub greet_pause: Option<Duration>,
}

/// An offence: the network to ban and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offence {
    pub cidr: Cidr,
    pub reason: String,
}

/// How an offence is punished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sentence {
    pub duration: Duration,
    /// This offence's number, counting the remembered ones.
    pub offences: u32,
}

impl Policy {
    /// The offence in a verdict, if it is one this policy bans.
    pub fn offence(&self, r: &Report) -> Option<Offence> {
        let reason = match r.verdict {
            Verdict::EarlyTalk => {
                format!(
                    "early-talk {}B after {:.2}s: {}",
                    r.bytes,
                    r.after.as_secs_f64(),
                    r.shown_payload()
                )
            }
            Verdict::Quit if self.ban_quitters && self.greet_pause.is_none_or(|p| r.after < p) => {
                match self.greet_pause {
                    Some(p) => format!(
                        "quit after {:.2}s of a {} greet pause",
                        r.after.as_secs_f64(),
                        crate::duration::show(p)
                    ),
                    None => format!("quit after {:.2}s", r.after.as_secs_f64()),
                }
            }
            Verdict::Quit | Verdict::Pass | Verdict::Pipeconnect | Verdict::Probe => return None,
        };
        Some(Offence {
            cidr: self.network(r.client.ip()),
            reason,
        })
    }

    /// The policy of a ban by hand: its time is given, its offence counted
    /// and remembered as the daemon does (`settings`, from the register).
    pub fn manual(settings: &crate::bans::BanSettings) -> Self {
        Policy {
            ban_time: Duration::from_secs(1),
            max_ban_time: Duration::MAX,
            ban_quitters: false,
            ipv6_prefix: 128,
            remember: Duration::from_secs(settings.remember_secs),
            greet_pause: None,
        }
    }

    /// The network banned for an offence from `addr`.
    pub fn network(&self, addr: IpAddr) -> Cidr {
        match addr {
            IpAddr::V4(_) => Cidr::host(addr),
            IpAddr::V6(_) => Cidr::around(addr, self.ipv6_prefix),
        }
    }

    /// The ban for a new offence, given what is remembered of the offender:
    /// each remembered offence doubles the ban time, up to the ceiling.
    pub fn sentence(&self, remembered: Option<&Ban>, now: u64) -> Sentence {
        let prior = remembered
            .filter(|b| b.remember_until > now)
            .map_or(0, |b| b.offences);
        let doubled = self
            .ban_time
            .saturating_mul(1u32.checked_shl(prior.min(31)).unwrap_or(u32::MAX));
        Sentence {
            duration: doubled.min(self.max_ban_time).max(Duration::from_secs(1)),
            offences: prior.saturating_add(1),
        }
    }

    /// The register entry for a sentence.
    pub fn ban(&self, sentence: &Sentence, reason: String, now: u64) -> Ban {
        let expires = now.saturating_add(sentence.duration.as_secs());
        Ban {
            expires,
            reason,
            offences: sentence.offences,
            remember_until: expires.saturating_add(self.remember.as_secs()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            ban_time: Duration::from_secs(3600),
            max_ban_time: Duration::from_secs(7 * 86400),
            ban_quitters: false,
            ipv6_prefix: 128,
            remember: Duration::from_secs(7 * 86400),
            greet_pause: None,
        }
    }

    fn report(verdict: Verdict, client: &str) -> Report {
        Report {
            verdict,
            pause: None,
            client: client.parse().unwrap(),
            server: "192.0.2.25:25".parse().unwrap(),
            after: Duration::from_millis(213),
            bytes: 11,
            payload: b"EHLO x\r\n\"".to_vec(),
            how: 0,
            passed_at: None,
        }
    }

    #[test]
    fn early_talk_is_an_offence_with_an_escaped_reason() {
        let o = policy()
            .offence(&report(Verdict::EarlyTalk, "198.51.100.7:4000"))
            .unwrap();
        assert_eq!(o.cidr.to_string(), "198.51.100.7/32");
        assert_eq!(o.reason, "early-talk 11B after 0.21s: EHLO x\\r\\n\"...");
    }

    #[test]
    fn quit_and_pass_are_not_offences_by_default() {
        assert!(
            policy()
                .offence(&report(Verdict::Quit, "198.51.100.7:1"))
                .is_none()
        );
        assert!(
            policy()
                .offence(&report(Verdict::Pass, "198.51.100.7:1"))
                .is_none()
        );
        let p = Policy {
            ban_quitters: true,
            ..policy()
        };
        assert_eq!(
            p.offence(&report(Verdict::Quit, "198.51.100.7:1"))
                .unwrap()
                .reason,
            "quit after 0.21s"
        );
        let paused = Policy {
            greet_pause: Some(Duration::from_secs(6)),
            ..p.clone()
        };
        assert_eq!(
            paused
                .offence(&report(Verdict::Quit, "198.51.100.7:1"))
                .unwrap()
                .reason,
            "quit after 0.21s of a 6s greet pause"
        );
        let short = Policy {
            greet_pause: Some(Duration::from_millis(100)),
            ..p
        };
        assert!(
            short
                .offence(&report(Verdict::Quit, "198.51.100.7:1"))
                .is_none(),
            "waited out the pause"
        );
        assert!(
            paused
                .offence(&report(Verdict::Pipeconnect, "198.51.100.7:1"))
                .is_none()
        );
        assert!(
            paused
                .offence(&report(Verdict::Probe, "198.51.100.7:1"))
                .is_none()
        );
    }

    #[test]
    fn ipv6_prefix_mode_bans_the_network() {
        let p = Policy {
            ipv6_prefix: 64,
            ..policy()
        };
        let o = p
            .offence(&report(Verdict::EarlyTalk, "[2001:db8:0:7::99]:4000"))
            .unwrap();
        assert_eq!(o.cidr.to_string(), "2001:db8:0:7::/64");
        assert_eq!(
            policy()
                .network("2001:db8::99".parse().unwrap())
                .to_string(),
            "2001:db8::99/128"
        );
    }

    #[test]
    fn repeat_offences_double_up_to_the_ceiling() {
        let p = policy();
        let now = 1_000_000;
        let first = p.sentence(None, now);
        assert_eq!(
            first,
            Sentence {
                duration: Duration::from_secs(3600),
                offences: 1
            }
        );
        let mut ban = p.ban(&first, "x".into(), now);
        let later = ban.expires + 10;
        let second = p.sentence(Some(&ban), later);
        assert_eq!(
            second,
            Sentence {
                duration: Duration::from_secs(7200),
                offences: 2
            }
        );
        ban.offences = 40;
        assert_eq!(p.sentence(Some(&ban), later).duration, p.max_ban_time);
        // Forgotten offences start over.
        assert_eq!(p.sentence(Some(&ban), ban.remember_until + 1).offences, 1);
    }
}
