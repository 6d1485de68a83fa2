//! Network namespaces and a veth pair behind RAII guards: a server namespace
//! (where the MTA and spamdelay run) and a client namespace, on documentation
//! addresses only. Everything is torn down on drop, even when a test panics.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 25);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x25);
/// Client addresses: 198.51.100.10.. and 2001:db8::10.. (`Lab::client_v4(i)`).
pub const CLIENT_ADDRS: u8 = 8;
/// The interface on the server side, where spamdelay attaches.
pub const SERVER_IF: &str = "sd-srv";
pub const CLIENT_IF: &str = "sd-cli";

/// `ip ...`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace (`ip netns add`), deleted on drop (unless it
/// is an `alias`).
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sdt-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle on the same namespace that leaves it alone on drop: for a
    /// fixture that must run things in a namespace it does not own (a
    /// private CrowdSec LAPI restarted in the lab's namespace).
    pub fn alias(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            owned: false,
        }
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// The namespace's network counter `name` as `nstat` names it
    /// (`TcpExtTCPFastOpenPassive`): its absolute value, nstat's history
    /// left alone.
    pub fn net_counter(&self, name: &str) -> Result<u64> {
        let out = self
            .command("nstat")
            .args(["-asz", name])
            .output()
            .context("running nstat (iproute2)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
            })
            .with_context(|| format!("no counter {name} in nstat's output: {text}"))
    }

    /// Runs `f` on a new thread that has entered the namespace, so every
    /// socket it opens lives there.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            setns(file, CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
            Ok(f())
        })
    }

    /// Runs `f` inside the namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        match self.spawn(f).join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = ip(&["netns", "del", &self.name]);
        }
    }
}

/// Two namespaces joined by a veth pair: `server` holds 192.0.2.25 and
/// 2001:db8::25, `client` holds 198.51.100.10+i and 2001:db8::10+i.
pub struct Lab {
    pub server: Netns,
    pub client: Netns,
}

impl Lab {
    pub fn new() -> Result<Self> {
        let server = Netns::new("s")?;
        let client = Netns::new("c")?;
        ip(&[
            "link",
            "add",
            SERVER_IF,
            "netns",
            server.name(),
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IF,
            "netns",
            client.name(),
        ])?;
        server.ip(&["addr", "add", &format!("{SERVER_V4}/24"), "dev", SERVER_IF])?;
        server.ip(&[
            "addr",
            "add",
            &format!("{SERVER_V6}/64"),
            "dev",
            SERVER_IF,
            "nodad",
        ])?;
        for i in 0..CLIENT_ADDRS {
            client.ip(&[
                "addr",
                "add",
                &format!("{}/24", Self::client_v4(i)),
                "dev",
                CLIENT_IF,
            ])?;
            client.ip(&[
                "addr",
                "add",
                &format!("{}/64", Self::client_v6(i)),
                "dev",
                CLIENT_IF,
                "nodad",
            ])?;
        }
        server.ip(&["link", "set", SERVER_IF, "up"])?;
        client.ip(&["link", "set", CLIENT_IF, "up"])?;
        server.ip(&["route", "add", "198.51.100.0/24", "dev", SERVER_IF])?;
        client.ip(&["route", "add", "192.0.2.0/24", "dev", CLIENT_IF])?;
        Ok(Lab { server, client })
    }

    pub fn client_v4(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 10 + i)
    }

    pub fn client_v6(i: u8) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10 + u16::from(i))
    }

    pub fn client_addr(i: u8, v6: bool) -> IpAddr {
        if v6 {
            Self::client_v6(i).into()
        } else {
            Self::client_v4(i).into()
        }
    }

    pub fn server_addr(v6: bool) -> IpAddr {
        if v6 {
            SERVER_V6.into()
        } else {
            SERVER_V4.into()
        }
    }
}

impl Lab {
    /// Runs client `f` from lab address `i` against the server's `port`, on a
    /// thread in the client namespace; the client's socket address as logged.
    pub fn run_client(
        &self,
        i: u8,
        v6: bool,
        port: u16,
        f: impl FnOnce(IpAddr, std::net::SocketAddr) -> anyhow::Result<u16> + Send + 'static,
    ) -> std::net::SocketAddr {
        let src = Self::client_addr(i, v6);
        let dst = std::net::SocketAddr::new(Self::server_addr(v6), port);
        let cport = self
            .client
            .run(move || f(src, dst))
            .expect("entering the client namespace")
            .expect("client");
        std::net::SocketAddr::new(src, cport)
    }

    /// Whether a new connection from client address `i` to the server's port
    /// 25 is refused (a TCP reset: what a ban with `--action reject` does).
    pub fn refused(&self, i: u8, v6: bool) -> bool {
        self.refused_from(Self::client_addr(i, v6))
    }

    /// Whether a new connection from `src` (any address the client
    /// namespace holds) to the server's port 25 is refused with a reset.
    pub fn refused_from(&self, src: IpAddr) -> bool {
        let dst = std::net::SocketAddr::new(Self::server_addr(src.is_ipv6()), 25);
        match self
            .client
            .run(move || crate::smtp::connect(src, dst))
            .expect("entering the client namespace")
        {
            Ok(_) => false,
            Err(e) => {
                assert!(
                    format!("{e:#}").contains("refused"),
                    "expected a refusal, got {e:#}"
                );
                true
            }
        }
    }
}
