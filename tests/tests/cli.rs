//! Every bad input gets a one-line error that says what to do, and a
//! non-zero exit, before anything is loaded or attached.

use std::process::{Command, Output};

use spamdelay_tests::daemon::binary;

fn spamdelay(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("running the spamdelay binary")
}

/// The error line (or else the first stderr line), after asserting the run failed.
fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let line = lines
        .iter()
        .find(|l| l.starts_with("spamdelay: error:"))
        .or(lines.first());
    line.map(|l| l.to_string()).unwrap_or_default()
}

/// spamdelay run as nobody with no capabilities (from root, via setpriv).
fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(binary())
        .args(args)
        .output()
        .expect("running setpriv (util-linux)")
}

#[test]
fn unknown_interface_is_named() {
    let line = error_line(&spamdelay(&["run", "--iface", "nosuchif0"]));
    assert_eq!(
        line,
        "spamdelay: error: unknown interface 'nosuchif0': `ip link` lists this host's interfaces"
    );
}

#[test]
fn bad_cidr_is_explained() {
    for bad in ["10.0.0.0/33", "300.1.2.3", "2001:db8::/129", "mail.example"] {
        let line = error_line(&spamdelay(&["run", "--iface", "lo", "--allow", bad]));
        assert!(
            line.contains(&format!(
                "bad CIDR '{bad}': expected an address or ADDRESS/PREFIX"
            )),
            "{line}"
        );
    }
}

#[test]
fn bad_port_is_explained() {
    for bad in ["0", "65536", "smtp"] {
        let line = error_line(&spamdelay(&["run", "--iface", "lo", "--port", bad]));
        assert!(
            line.contains(&format!("invalid value '{bad}' for '--port <PORT>'")),
            "{line}"
        );
    }
}

#[test]
fn too_many_ports_are_refused() {
    let mut args = vec!["run", "--iface", "lo"];
    let ports: Vec<String> = (1..=9).map(|p| p.to_string()).collect();
    for p in &ports {
        args.extend(["--port", p]);
    }
    let line = error_line(&spamdelay(&args));
    assert_eq!(
        line,
        "spamdelay: error: 9 ports given, at most 8 can be watched: drop some --port values"
    );
}

#[test]
fn missing_privilege_says_how_to_get_it() {
    if !nix::unistd::geteuid().is_root() {
        // Unprivileged already: the plain run shows the message.
        let line = error_line(&spamdelay(&["run", "--iface", "lo"]));
        assert!(line.contains("not enough privilege"), "{line}");
        return;
    }
    let line = error_line(&as_nobody(&["run", "--iface", "lo"]));
    assert!(
        line.starts_with("spamdelay: error: not enough privilege (missing CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): run spamdelay as root"),
        "{line}"
    );
}

#[test]
fn missing_nft_is_explained() {
    if !spamdelay_tests::privileged("missing_nft_is_explained") {
        return;
    }
    let ns = spamdelay_tests::lab::Netns::new("nonft").expect("a namespace");
    let state = tempfile::tempdir().expect("a state directory");
    for args in [vec!["run", "--iface", "lo"], vec!["ban", "198.51.100.1"]] {
        // `env` inside the namespace, so `ip` itself is still found.
        let out = ns
            .command("env")
            .arg("PATH=/nonexistent")
            .arg(binary())
            .arg("--state-dir")
            .arg(state.path())
            .args(&args)
            .output()
            .expect("running spamdelay");
        let line = error_line(&out);
        assert!(
            line.ends_with("nft is not installed: install nftables (apt-get install nftables)"),
            "{args:?}: {line}"
        );
    }
}

#[test]
fn an_address_that_is_not_an_address_is_refused() {
    for bad in ["ban", "unban"] {
        let line = error_line(&spamdelay(&[bad, "mail.example.com"]));
        assert!(line.contains("bad CIDR 'mail.example.com'"), "{line}");
    }
    let line = error_line(&spamdelay(&["ban", "198.51.100.7", "--time", "soon"]));
    assert!(line.contains("bad duration 'soon'"), "{line}");
}

#[test]
fn corrupt_state_file_is_kept_aside_and_reported() {
    let dir = tempfile::tempdir().expect("a state directory");
    std::fs::write(dir.path().join("bans.json"), b"{ this is not json").expect("a corrupt file");
    let out = spamdelay(&["--state-dir", dir.path().to_str().expect("utf-8"), "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: state file "), "{stderr}");
    assert!(stderr.contains("bans.json is corrupt ("), "{stderr}");
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("listing the state directory")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("bans.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "kept aside");
    assert_eq!(
        std::fs::read(aside[0].path()).expect("the kept file"),
        b"{ this is not json"
    );
    assert!(out.status.success(), "list goes on with an empty register");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no bans in force"
    );
}

#[test]
fn admin_commands_without_privilege_say_how_to_get_it() {
    if !nix::unistd::geteuid().is_root() {
        let line = error_line(&spamdelay(&["ban", "198.51.100.7"]));
        assert!(line.contains("not enough privilege"), "{line}");
        return;
    }
    for args in [["ban", "198.51.100.7"], ["unban", "198.51.100.7"]] {
        let line = error_line(&as_nobody(&[
            "--state-dir",
            "/nonexistent/spamdelay",
            args[0],
            args[1],
        ]));
        assert_eq!(
            line,
            "spamdelay: error: not enough privilege (missing CAP_NET_ADMIN): run as root, or grant CAP_NET_ADMIN to manage table inet spamdelay"
        );
    }
}
