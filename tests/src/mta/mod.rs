//! Real MTAs run in a lab's server namespace with private configs: Postfix
//! postscreen, Exim with a connect-ACL delay, Sendmail with greet_pause; and
//! Exim as a sending client in the client namespace (`exim::client`).
//! Installed by `tests/mta/install-*.sh` (`.ci/run` calls them).

use std::path::PathBuf;

pub mod exim;
pub mod postfix;
pub mod sendmail;

/// Where the install scripts unpack MTAs that cannot be installed side by
/// side (`SPAMDELAY_MTA_DIR`, default /opt/spamdelay-test).
pub fn unpack_dir() -> PathBuf {
    std::env::var_os("SPAMDELAY_MTA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/spamdelay-test"))
}

/// Both gates of an MTA test: root (`crate::privileged`) and the MTA installed.
pub fn ready(test: &str, what: &str, present: bool) -> bool {
    crate::privileged(test) && available(test, what, present)
}

/// True when `what` is installed. Without it a test prints a loud SKIPPED and
/// returns, except under CI (`CI` set), where a missing MTA fails.
pub fn available(test: &str, what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: {what} is not installed, and CI must run every test (see tests/mta/install-*.sh)"
        );
    }
    eprintln!(
        "\n!!!!! SKIPPED {test}: {what} is not installed: run tests/mta/install-*.sh as root. !!!!!\n"
    );
    false
}
