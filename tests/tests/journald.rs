//! Under systemd the daemon logs to the journal itself: each record with its
//! priority, verdicts and bans with their fields (SPAMDELAY_VERDICT,
//! SPAMDELAY_CLIENT, SPAMDELAY_BAN_TIME). Without systemd here, the daemon
//! runs with `JOURNAL_STREAM` naming its stderr, as systemd would set it,
//! and a socket of the test's own bind-mounted where the journal's would be
//! (/run/systemd/journal/socket), in a mount namespace of its own.

use std::{
    collections::HashMap,
    os::{fd::AsFd, unix::net::UnixDatagram},
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use spamdelay_tests::{
    Watched,
    daemon::binary,
    lab::{Lab, SERVER_IF},
    privileged,
    scenario::VERDICT_WAIT,
    smtp::{self, Greeting, TestServer},
};

/// One journal record: its fields.
type Record = HashMap<String, String>;

/// Parses a datagram of the journal's native protocol: `KEY=VALUE\n`, or
/// `KEY\n`, a 64-bit little-endian length, the value and `\n` for values
/// that may hold newlines.
fn parse(mut data: &[u8]) -> Record {
    let mut record = Record::new();
    while let Some(nl) = data.iter().position(|&b| b == b'\n') {
        let line = &data[..nl];
        data = &data[nl + 1..];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            record.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            continue;
        }
        let Some((len, rest)) = data.split_first_chunk::<8>() else {
            break;
        };
        let len = usize::try_from(u64::from_le_bytes(*len)).unwrap_or(usize::MAX);
        let Some(value) = rest.get(..len) else {
            break;
        };
        record.insert(
            String::from_utf8_lossy(line).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        );
        data = rest.get(len + 1..).unwrap_or_default();
    }
    record
}

#[test]
fn native_protocol_is_parsed() {
    let mut data = b"PRIORITY=5\nMESSAGE\n".to_vec();
    data.extend_from_slice(&7u64.to_le_bytes());
    data.extend_from_slice(b"two\nway\nSPAMDELAY_BAN_TIME=3600\n");
    let r = parse(&data);
    assert_eq!(r["PRIORITY"], "5");
    assert_eq!(r["MESSAGE"], "two\nway");
    assert_eq!(r["SPAMDELAY_BAN_TIME"], "3600");
}

/// The daemon, logging to the test's journal socket.
struct Journaled {
    child: Child,
    records: Arc<Watched<Vec<Record>>>,
    stderr: Arc<Watched<Vec<String>>>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Journaled {
    fn start(lab: &Lab) -> Self {
        let socket_dir = tempfile::tempdir().expect("a directory for the socket");
        let state = tempfile::tempdir().expect("a state directory");
        let socket = UnixDatagram::bind(socket_dir.path().join("socket")).expect("the socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("a read timeout");
        let records: Arc<Watched<Vec<Record>>> = Arc::default();
        let sink = records.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match socket.recv(&mut buf) {
                    // The logger's empty hello at start.
                    Ok(0) => {}
                    Ok(n) => sink.update(|all| all.push(parse(&buf[..n]))),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
                // The test has ended when nobody else holds the records.
                if Arc::strong_count(&sink) == 1 {
                    return;
                }
            }
        });
        // What systemd does: stderr is the journal's stream, named by
        // JOURNAL_STREAM (its device and inode).
        let (read, write) = nix::unistd::pipe().expect("a pipe");
        let st = nix::sys::stat::fstat(write.as_fd()).expect("fstat");
        let stream = format!("{}:{}", st.st_dev, st.st_ino);
        // A private mount namespace, so /run/systemd/journal is ours alone
        // (a tmpfs on /run/systemd keeps the host's untouched).
        let script = r#"[ -d /run/systemd ] || mkdir /run/systemd
mount -t tmpfs -o size=1m,mode=0755 spamdelay-test /run/systemd &&
mkdir /run/systemd/journal &&
mount --bind "$SOCKET_DIR" /run/systemd/journal &&
exec "$@""#;
        let mut cmd = lab.server.command("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(binary())
        .arg("--state-dir")
        .arg(state.path())
        .args(["run", "--iface", SERVER_IF, "--mta", "none", "--no-pin"])
        .args(["--bridge-time", "0", "--ipv6-aggregate", "0"])
        .env("SOCKET_DIR", socket_dir.path())
        .env("JOURNAL_STREAM", &stream)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(write));
        let child = cmd.spawn().expect("starting spamdelay");
        drop(cmd);
        let stderr: Arc<Watched<Vec<String>>> = Arc::default();
        let lines = stderr.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let pipe = std::fs::File::from(read);
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.update(|all| all.push(line));
            }
        });
        let d = Journaled {
            child,
            records,
            stderr,
            _dirs: (socket_dir, state),
        };
        if d.wait(|r| message(r).starts_with("watching port"))
            .is_none()
        {
            panic!(
                "spamdelay did not start: journal {:#?}, stderr {:#?}",
                d.all(),
                d.stderr.read(Vec::clone)
            );
        }
        d
    }

    fn wait(&self, pred: impl Fn(&Record) -> bool) -> Option<Record> {
        self.records.wait_for(VERDICT_WAIT * 6, |all| {
            all.iter().find(|r| pred(r)).cloned()
        })
    }

    fn all(&self) -> Vec<Record> {
        self.records.read(Vec::clone)
    }

    /// SIGTERM; whether it exited 0.
    fn stop(mut self) -> bool {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Journaled {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn message(r: &Record) -> &str {
    r.get("MESSAGE").map_or("", String::as_str)
}

fn field<'r>(r: &'r Record, key: &str) -> &'r str {
    r.get(key).map_or("", String::as_str)
}

#[test]
fn under_systemd_verdicts_and_bans_reach_the_journal_with_their_fields() {
    if !privileged("under_systemd_verdicts_and_bans_reach_the_journal_with_their_fields") {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let _server =
        TestServer::start(&lab.server, 25, Greeting::pause(1500)).expect("the test server");
    let d = Journaled::start(&lab);
    let watching = d
        .wait(|r| message(r).starts_with("watching port"))
        .expect("the start-up record");
    assert_eq!(field(&watching, "PRIORITY"), "5", "info is notice");
    assert_eq!(field(&watching, "SYSLOG_IDENTIFIER"), "spamdelay");
    // A warning carries its priority, not a `warning: ` prefix.
    let warning = d
        .wait(|r| message(r).starts_with("no greet pause"))
        .unwrap_or_else(|| panic!("no warning: {:#?}", d.all()));
    assert_eq!(field(&warning, "PRIORITY"), "4");

    let blind = lab.run_client(0, false, 25, smtp::blind);
    let ip = blind.ip().to_string();
    let verdict = d
        .wait(|r| message(r).starts_with("EARLY-TALK"))
        .unwrap_or_else(|| panic!("no verdict: {:#?}", d.all()));
    assert_eq!(field(&verdict, "SPAMDELAY_VERDICT"), "EARLY-TALK");
    assert_eq!(field(&verdict, "SPAMDELAY_CLIENT"), ip);
    assert_eq!(field(&verdict, "PRIORITY"), "5");
    assert!(
        message(&verdict).contains(&format!("from [{ip}]:{} ", blind.port())),
        "{verdict:#?}"
    );
    let ban = d
        .wait(|r| message(r).starts_with(&format!("ban [{ip}] for 1h (offence 1)")))
        .unwrap_or_else(|| panic!("no ban: {:#?}", d.all()));
    assert_eq!(field(&ban, "SPAMDELAY_CLIENT"), ip);
    let secs: u64 = field(&ban, "SPAMDELAY_BAN_TIME")
        .parse()
        .unwrap_or_else(|_| panic!("no ban time: {ban:#?}"));
    assert!((3590..=3600).contains(&secs), "{secs}");

    // Nothing of it on stderr: the journal has it once.
    let stderr = d.stderr.read(Vec::clone);
    assert!(
        !stderr
            .iter()
            .any(|l| l.starts_with("watching port") || l.starts_with("EARLY-TALK")),
        "{stderr:#?}"
    );
    assert!(d.stop(), "SIGTERM exits 0");
}
