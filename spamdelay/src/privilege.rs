//! Up-front checks that turn the kernel's bare EPERM into advice.

/// Capabilities `run` needs when not root: load programs and maps (CAP_BPF),
/// attach to tc (CAP_NET_ADMIN), read-write packet data and time (CAP_PERFMON).
/// The flag says whether CAP_SYS_ADMIN stands in for it (kernels before 5.8).
const NEEDED: [(u32, &str, bool); 3] = [
    (39, "CAP_BPF", true),
    (12, "CAP_NET_ADMIN", false),
    (38, "CAP_PERFMON", true),
];
const CAP_SYS_ADMIN: u32 = 21;

/// Err with a one-line explanation when the process lacks what `run` needs.
pub fn check_run() -> anyhow::Result<()> {
    let eff = effective_caps().unwrap_or(0);
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|&&(bit, _, sys_admin_will_do)| {
            let granted = has(bit) || (sys_admin_will_do && has(CAP_SYS_ADMIN));
            !granted
        })
        .map(|(_, name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "not enough privilege (missing {}): run spamdelay as root, or from its systemd unit which grants CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON",
        missing.join(", ")
    )
}

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

const CAP_NET_ADMIN: u32 = 12;

/// Err unless the process may change nftables (`ban`, `unban`).
pub fn check_nft() -> anyhow::Result<()> {
    if effective_caps().unwrap_or(0) & (1u64 << CAP_NET_ADMIN) != 0 {
        return Ok(());
    }
    anyhow::bail!(
        "not enough privilege (missing CAP_NET_ADMIN): run as root, or grant CAP_NET_ADMIN to manage table inet spamdelay"
    )
}
