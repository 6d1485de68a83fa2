//! `cargo xtask demo`: a throwaway namespace lab with a pausing SMTP server,
//! spamdelay attached, and a parade of clients; prints the daemon's verdicts.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use spamdelay_tests::{
    daemon::Daemon,
    lab::{Lab, SERVER_IF, SERVER_V4, SERVER_V6},
    smtp::{self, Greeting, TestServer},
};

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("the demo builds network namespaces and loads eBPF: run it as root");
    }
    let lab = Lab::new().context("building the namespace lab")?;
    let greeting = Greeting::pause(2000).with_teaser();
    let _server = TestServer::start(&lab.server, 25, greeting)?;
    println!(
        "lab: SMTP server at [{SERVER_V4}]:25 and [{SERVER_V6}]:25 in namespace {}, sending a 220- teaser",
        lab.server.name()
    );
    println!(
        "     at once and its final 220 after a 2 s greet pause; clients in namespace {}",
        lab.client.name()
    );
    println!("daemon: spamdelay run --iface {SERVER_IF}\n");
    let daemon = Daemon::start(&lab.server, &["--iface", SERVER_IF])?;
    let mut shown = 0;
    let mut show = |d: &Daemon| {
        let lines = d.lines();
        for l in &lines[shown..] {
            println!("  spamdelay| {l}");
        }
        shown = lines.len();
    };
    show(&daemon);

    let v4 = SocketAddr::from((SERVER_V4, 25));
    let v6 = SocketAddr::from((SERVER_V6, 25));
    type Client = fn(std::net::IpAddr, SocketAddr) -> Result<u16>;
    let parade: [(&str, u8, SocketAddr, Client); 5] = [
        (
            "patient client: waits for the final 220, says EHLO and QUIT",
            0,
            v4,
            smtp::patient,
        ),
        (
            "blind sender: EHLO and MAIL before any greeting",
            1,
            v4,
            smtp::blind,
        ),
        (
            "teaser talker: reads the 220- teaser, talks before the final 220",
            2,
            v4,
            smtp::teaser_talker,
        ),
        ("IPv6 blind sender", 3, v6, smtp::blind),
        ("quitter: hangs up after 0.5 s of silence", 4, v4, |s, d| {
            smtp::hang_up(s, d, Duration::from_millis(500))
        }),
    ];
    for (what, i, dst, client) in parade {
        let src = Lab::client_addr(i, dst.is_ipv6());
        println!("\nclient [{src}]: {what}");
        let port = lab.client.run(move || client(src, dst))??;
        let peer = SocketAddr::new(src, port);
        if daemon.verdict_for(peer, Duration::from_secs(5)).is_none() {
            println!("  (no verdict for {peer})");
        }
        show(&daemon);
    }
    println!(
        "\nstopping the daemon (SIGTERM): it prints its counters; its pinned links keep watching until `spamdelay detach`"
    );
    let (status, lines) = daemon.stop()?;
    for l in &lines[shown..] {
        println!("  spamdelay| {l}");
    }
    println!("\ndaemon exited with {status}; lab torn down.");
    Ok(())
}
