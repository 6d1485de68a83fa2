//! The kernel stamps passes with CLOCK_BOOTTIME; the register and logs use
//! wall-clock time. This reads the one and turns its stamps into the other.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// CLOCK_BOOTTIME now, in nanoseconds (what `bpf_ktime_get_boot_ns` reads).
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if ret != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The wall-clock time of a CLOCK_BOOTTIME stamp.
pub fn boot_to_wall(stamp_ns: u64) -> SystemTime {
    let ago = Duration::from_nanos(boot_ns().saturating_sub(stamp_ns));
    SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_boot_time() {
        let now = SystemTime::now();
        let wall = boot_to_wall(boot_ns());
        let drift = now.duration_since(wall).unwrap_or_else(|e| e.duration());
        assert!(drift < Duration::from_secs(1), "{drift:?}");
        let earlier = boot_to_wall(boot_ns() - 5_000_000_000);
        let ago = now.duration_since(earlier).unwrap();
        assert!(ago >= Duration::from_secs(4) && ago < Duration::from_secs(6));
    }
}
