//! The allowlist: admin CIDRs plus loopback and the host's own addresses,
//! which the kernel never tracks.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;

/// An address or network, parsed once at the CLI boundary. Host bits are
/// cleared: `192.0.2.7/24` means `192.0.2.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(IpNet);

#[derive(Debug, thiserror::Error)]
#[error(
    "bad CIDR '{0}': expected an address or ADDRESS/PREFIX such as 192.0.2.0/24 or 2001:db8::/32"
)]
pub struct BadCidr(String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|a| Cidr(IpNet::from(a)))
            .map_err(|_| BadCidr(s.to_string()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Cidr {
    pub fn host(addr: IpAddr) -> Self {
        Cidr(IpNet::from(addr))
    }

    pub fn addr(&self) -> IpAddr {
        self.0.network()
    }

    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    pub fn contains(&self, addr: &IpAddr) -> bool {
        self.0.contains(addr)
    }

    /// This network includes all of `other`.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.0.contains(&other.0)
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr().is_ipv4()
    }

    /// Whether this is a single address (a /32 or /128).
    pub fn is_host(&self) -> bool {
        self.0.prefix_len() == self.0.max_prefix_len()
    }

    /// The network of `prefix_len` bits around `addr`.
    pub fn around(addr: IpAddr, prefix_len: u8) -> Self {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let net = IpNet::new(addr, prefix_len.min(max)).unwrap_or_else(|_| IpNet::from(addr));
        Cidr(net.trunc())
    }

    /// Bounds, in `Cidr` order, of every network inside this one: a range
    /// of a sorted map. (It also holds the wider networks that share this
    /// one's first address: filter with `covers`.)
    pub fn span(&self) -> std::ops::RangeInclusive<Cidr> {
        let first = IpNet::new(self.0.network(), 0).unwrap_or(self.0);
        let last = IpNet::new(self.0.broadcast(), self.0.max_prefix_len()).unwrap_or(self.0);
        Cidr(first)..=Cidr(last)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Loopback networks, always allowed.
pub fn loopback() -> [Cidr; 2] {
    [
        Cidr("127.0.0.0/8".parse().expect("literal CIDR")),
        Cidr("::1/128".parse().expect("literal CIDR")),
    ]
}

/// Every address configured on this host (in this network namespace).
pub fn host_addresses() -> std::io::Result<Vec<Cidr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(Cidr::host(IpAddr::V4(v4.ip())));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(Cidr::host(IpAddr::V6(v6.ip())));
        }
    }
    Ok(out)
}

/// The full allowlist for `run`: admin CIDRs, loopback, the host's addresses.
pub fn effective(admin: &[Cidr]) -> std::io::Result<Vec<Cidr>> {
    let mut all: Vec<Cidr> = admin.to_vec();
    all.extend(loopback());
    all.extend(host_addresses()?);
    all.sort();
    all.dedup();
    // Drop what a broader entry already covers (127.0.0.1 inside 127.0.0.0/8).
    let covered = |c: &Cidr| all.iter().any(|o| o != c && o.0.contains(&c.0));
    Ok(all.iter().filter(|c| !covered(c)).copied().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_networks_and_bare_addresses() {
        assert_eq!(
            "192.0.2.7/24".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            "2001:db8::1".parse::<Cidr>().unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert_eq!("198.51.100.1".parse::<Cidr>().unwrap().prefix_len(), 32);
    }

    #[test]
    fn rejects_what_is_not_a_cidr() {
        for bad in [
            "300.1.1.1/8",
            "192.0.2.0/33",
            "2001:db8::/129",
            "mail.example",
            "",
        ] {
            let err = bad.parse::<Cidr>().unwrap_err().to_string();
            assert!(err.starts_with("bad CIDR"), "{bad}: {err}");
        }
    }

    #[test]
    fn loopback_is_always_allowed() {
        let all = effective(&[]).unwrap();
        assert!(
            all.iter()
                .any(|c| c.contains(&"127.0.0.1".parse().unwrap()))
        );
        assert!(all.iter().any(|c| c.contains(&"::1".parse().unwrap())));
    }
}
