//! CrowdSec for the fleet tests: a fleet lab (two independent labs whose
//! server namespaces share a private network with a LAPI namespace), a
//! private CrowdSec Local API (Debian's `crowdsec` 1.4.6 run as `crowdsec
//! -no-cs`, no central API, no hub) with its own config and sqlite database
//! in a temporary directory, HTTP calls to it from any lab namespace, and
//! the secret files the daemon reads.
//!
//! ```ignore
//! let fleet = FleetLab::new()?;
//! let mut lapi = Lapi::start(&fleet.lapi, LAPI_ADDR)?;
//! lapi.add_machine("mx-a", "pw-a")?;
//! let key = lapi.add_bouncer("mx-b")?;
//! let secrets = Secrets::new()?;
//! let password = secrets.password_file("mx-a", "pw-a")?;
//! let key_file = secrets.key_file("mx-b", &key)?;
//! // daemons in fleet.lab_a.server and fleet.lab_b.server talk to LAPI_URL
//! let token = lapi.token(&fleet.lab_a.server, "mx-a", "pw-a")?;
//! lapi.post_alerts(&fleet.lab_a.server, &token, &[ban_alert("Ip", "198.51.100.10", "1h", SystemTime::now())])?;
//! let stream = lapi.stream(&fleet.lab_b.server, &key, true)?.json()?;
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};

use crate::{
    Watched,
    http::{self, Response},
    lab::{Lab, Netns, ip},
};

pub const CROWDSEC: &str = "/usr/bin/crowdsec";
pub const CSCLI: &str = "/usr/bin/cscli";

/// The LAPI namespace's address, on its bridge.
pub const LAPI_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// `lab_a.server`'s address on the fleet network.
pub const FLEET_A_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// `lab_b.server`'s address on the fleet network.
pub const FLEET_B_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
/// The fleet network's prefix length (203.0.113.0/24).
pub const FLEET_PREFIX: u8 = 24;
pub const LAPI_PORT: u16 = 8080;
/// Where the fleet's LAPI listens (`Lapi::start(&fleet.lapi, LAPI_ADDR)`).
pub const LAPI_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(LAPI_V4, LAPI_PORT));
/// The URL the daemons are given.
pub const LAPI_URL: &str = "http://203.0.113.1:8080";
/// The bridge in the LAPI namespace.
pub const LAPI_BRIDGE: &str = "sd-fleet";
/// The fleet leg in each server namespace (spamdelay attaches to
/// `lab::SERVER_IF`, not to this).
pub const FLEET_IF: &str = "sd-lapi";

/// What spamdelay's alerts and decisions carry.
pub const ORIGIN: &str = "spamdelay";
pub const SCENARIO: &str = "spamdelay/early-talk";
/// LAPI 1.4.6 refuses a login whose User-Agent has not exactly one `/`.
pub const USER_AGENT: &str = "spamdelay/0.1.0";
/// The machine the fixture registers for its own `cscli` calls (`cscli
/// decisions list` goes through the API): it shows in `machines list`.
pub const CSCLI_MACHINE: &str = "spamdelay-tests-cscli";

/// Two independent labs (`lab_a`, `lab_b`: each a server and a client
/// namespace with `Lab`'s addresses, so client 198.51.100.10 exists in
/// both) and a namespace `lapi` whose bridge (203.0.113.1/24) has a veth
/// leg to each server namespace (203.0.113.2 in `lab_a.server`, 203.0.113.3
/// in `lab_b.server`, on `FLEET_IF`). Every namespace is deleted on drop,
/// and the veth pairs and the bridge with them.
pub struct FleetLab {
    pub lab_a: Lab,
    pub lab_b: Lab,
    pub lapi: Netns,
}

impl FleetLab {
    pub fn new() -> Result<Self> {
        let lab_a = Lab::new().context("lab A")?;
        let lab_b = Lab::new().context("lab B")?;
        let lapi = Netns::new("lapi")?;
        lapi.ip(&["link", "add", LAPI_BRIDGE, "type", "bridge"])?;
        lapi.ip(&[
            "addr",
            "add",
            &format!("{LAPI_V4}/{FLEET_PREFIX}"),
            "dev",
            LAPI_BRIDGE,
        ])?;
        lapi.ip(&["link", "set", LAPI_BRIDGE, "up"])?;
        for (server, leg, addr) in [
            (&lab_a.server, "sd-leg-a", FLEET_A_V4),
            (&lab_b.server, "sd-leg-b", FLEET_B_V4),
        ] {
            ip(&[
                "link",
                "add",
                FLEET_IF,
                "netns",
                server.name(),
                "type",
                "veth",
                "peer",
                "name",
                leg,
                "netns",
                lapi.name(),
            ])?;
            lapi.ip(&["link", "set", leg, "master", LAPI_BRIDGE])?;
            lapi.ip(&["link", "set", leg, "up"])?;
            server.ip(&[
                "addr",
                "add",
                &format!("{addr}/{FLEET_PREFIX}"),
                "dev",
                FLEET_IF,
            ])?;
            server.ip(&["link", "set", FLEET_IF, "up"])?;
        }
        Ok(FleetLab { lab_a, lab_b, lapi })
    }

    /// The two labs, A first.
    pub fn labs(&self) -> [&Lab; 2] {
        [&self.lab_a, &self.lab_b]
    }

    /// Lab `i`'s (0: A, 1: B) server address on the fleet network.
    pub fn fleet_addr(i: usize) -> Ipv4Addr {
        [FLEET_A_V4, FLEET_B_V4][i]
    }
}

/// A private CrowdSec Local API run in a namespace (`crowdsec -c CONFIG
/// -no-cs`), with its config, sqlite database (WAL), empty hub, profiles
/// and simulation files in a temporary directory of its own. `stop` and
/// `restart` keep the directory, so machines, bouncers and decisions
/// persist (the JWT secret does not: tokens from before a restart get
/// 401). Killed on drop.
pub struct Lapi {
    /// Where it runs (a handle that does not delete the namespace).
    ns: Netns,
    /// Where it listens.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    log: Arc<Watched<Vec<String>>>,
}

impl Lapi {
    /// Writes the config into a new directory, starts LAPI in `ns` on
    /// `listen` (a concrete address: the fixture's HTTP calls go to it),
    /// waits (30 s at most) until `/health` answers there, and registers
    /// the machine the fixture's `cscli` calls use.
    pub fn start(ns: &Netns, listen: SocketAddr) -> Result<Self> {
        let dir = tempfile::tempdir().context("creating the LAPI's directory")?;
        write_config(dir.path(), listen)?;
        let mut lapi = Lapi {
            ns: ns.alias(),
            addr: listen,
            dir,
            child: None,
            log: Arc::default(),
        };
        lapi.spawn()?;
        let creds = lapi.dir.path().join("local_api_credentials.yaml");
        lapi.cscli_os(&[
            "machines".as_ref(),
            "add".as_ref(),
            CSCLI_MACHINE.as_ref(),
            "--auto".as_ref(),
            "-f".as_ref(),
            creds.as_os_str(),
        ])
        .context("registering the fixture's cscli machine")?;
        Ok(lapi)
    }

    /// The LAPI's directory: config.yaml, profiles.yaml, simulation.yaml,
    /// hub/, data/crowdsec.db.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// `http://ADDR`, as a daemon is given it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The running LAPI's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What LAPI logged, every start's lines in order.
    pub fn lines(&self) -> Vec<String> {
        self.log.read(Vec::clone)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut child = self
            .ns
            .command(CROWDSEC)
            .arg("-c")
            .arg(self.config())
            .arg("-no-cs")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting crowdsec (Debian package crowdsec; cargo xtask setup)")?;
        let sink = self.log.clone();
        crate::read_lines(&mut child, move |line, _| {
            sink.update(|lines| lines.push(line))
        });
        self.child = Some(child);
        let ready = crate::until(Duration::from_secs(30), || {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return true;
            }
            self.health(&self.ns).unwrap_or(false)
        });
        let exited = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if !ready || exited.is_some() {
            std::thread::sleep(Duration::from_millis(100));
            bail!(
                "crowdsec LAPI did not answer on {} within 30 s (exit {exited:?}): {:#?}",
                self.addr,
                self.lines()
            );
        }
        Ok(())
    }

    /// SIGTERM, then the exit (LAPI 1.4.6 exits in ~10 ms; once 1.6 s was
    /// seen); SIGKILL and an error after 15 s. Nothing when it is not
    /// running.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        let done = crate::until(Duration::from_secs(15), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !done {
            let _ = child.kill();
            let _ = child.wait();
            bail!("crowdsec LAPI still ran 15 s after SIGTERM");
        }
        Ok(())
    }

    /// Stops LAPI if it runs, then starts it again on the same directory
    /// and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// `cscli -c CONFIG ARGS` in the LAPI's namespace: its stdout, or an
    /// error with its stderr.
    pub fn cscli(&self, args: &[&str]) -> Result<String> {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        self.cscli_os(&args)
    }

    fn cscli_os(&self, args: &[&std::ffi::OsStr]) -> Result<String> {
        let out = self
            .ns
            .command(CSCLI)
            .arg("-c")
            .arg(self.config())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running cscli (Debian package crowdsec)")?;
        if !out.status.success() {
            bail!(
                "cscli {}: {}{}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Registers a validated machine (watcher) `id` with `password`.
    pub fn add_machine(&self, id: &str, password: &str) -> Result<()> {
        self.cscli(&[
            "machines",
            "add",
            id,
            "--password",
            password,
            "-f",
            "/dev/null",
        ])
        .map(|_| ())
    }

    /// Validates a machine that registered itself over HTTP.
    pub fn validate_machine(&self, id: &str) -> Result<()> {
        self.cscli(&["machines", "validate", id]).map(|_| ())
    }

    /// Registers bouncer `name`: its API key.
    pub fn add_bouncer(&self, name: &str) -> Result<String> {
        let key = self.cscli(&["bouncers", "add", name, "-o", "raw"])?;
        let key = key.trim();
        if key.is_empty() {
            bail!("cscli bouncers add {name} printed no key");
        }
        Ok(key.to_string())
    }

    /// `POST /v1/watchers` (from the LAPI's namespace): machine `id` exists
    /// but is not validated, so its logins get 401 until
    /// `validate_machine`.
    pub fn register_unvalidated(&self, id: &str, password: &str) -> Result<()> {
        let body = json!({ "machine_id": id, "password": password }).to_string();
        let r = self.request(
            &self.ns,
            "POST",
            "/v1/watchers",
            &[
                ("User-Agent", USER_AGENT),
                ("Content-Type", "application/json"),
            ],
            Some(&body),
        )?;
        if r.status != 201 {
            bail!("POST /v1/watchers for {id}: HTTP {} {}", r.status, r.body);
        }
        Ok(())
    }

    /// `cscli decisions list -o json`, with `--origin ORIGIN` or, for
    /// `None`, `-a` (every origin): the alerts that hold active decisions,
    /// each with its `decisions` (`Value::Null` when there are none).
    pub fn decisions(&self, origin: Option<&str>) -> Result<Value> {
        let out = match origin {
            Some(o) => self.cscli(&["decisions", "list", "--origin", o, "-o", "json"])?,
            None => self.cscli(&["decisions", "list", "-a", "-o", "json"])?,
        };
        serde_json::from_str(out.trim())
            .with_context(|| format!("cscli decisions list printed {out:?}"))
    }

    /// The values (`198.51.100.10`, `2001:db8::/64`) of the active
    /// decisions `decisions(origin)` lists.
    pub fn decision_values(&self, origin: Option<&str>) -> Result<Vec<String>> {
        Ok(alert_decisions(&self.decisions(origin)?)
            .filter_map(|d| d["value"].as_str().map(str::to_string))
            .collect())
    }

    /// Any request to LAPI from `from` (a lab namespace).
    pub fn request(
        &self,
        from: &Netns,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Response> {
        http::request(from, self.addr, method, path, headers, body)
    }

    /// Whether `GET /health` answers 200 from `from`.
    pub fn health(&self, from: &Netns) -> Result<bool> {
        Ok(self.request(from, "GET", "/health", &[], None)?.status == 200)
    }

    /// `POST /v1/watchers/login` from `from` with `USER_AGENT`: the answer,
    /// whatever its status.
    pub fn login(&self, from: &Netns, id: &str, password: &str) -> Result<Response> {
        let body = json!({ "machine_id": id, "password": password }).to_string();
        self.request(
            from,
            "POST",
            "/v1/watchers/login",
            &[
                ("User-Agent", USER_AGENT),
                ("Content-Type", "application/json"),
            ],
            Some(&body),
        )
    }

    /// A JWT for machine `id` (an error unless the login answers 200).
    pub fn token(&self, from: &Netns, id: &str, password: &str) -> Result<String> {
        let r = self.login(from, id, password)?;
        if r.status != 200 {
            bail!("login as {id}: HTTP {} {}", r.status, r.body);
        }
        r.json()?["token"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("login as {id}: no token in {}", r.body))
    }

    /// `POST /v1/alerts` with `token`: 201 and the alert ids, when LAPI
    /// takes them.
    pub fn post_alerts(&self, from: &Netns, token: &str, alerts: &[Value]) -> Result<Response> {
        let body = Value::from(alerts.to_vec()).to_string();
        self.request(
            from,
            "POST",
            "/v1/alerts",
            &[
                ("User-Agent", USER_AGENT),
                ("Authorization", &format!("Bearer {token}")),
                ("Content-Type", "application/json"),
            ],
            Some(&body),
        )
    }

    /// `GET PATH` with `token` (`/v1/alerts?origin=spamdelay`).
    pub fn get_with_token(&self, from: &Netns, token: &str, path: &str) -> Result<Response> {
        self.request(
            from,
            "GET",
            path,
            &[
                ("User-Agent", USER_AGENT),
                ("Authorization", &format!("Bearer {token}")),
            ],
            None,
        )
    }

    /// `DELETE /v1/decisions?QUERY` with `token` (`ip=198.51.100.10`,
    /// `range=198.51.100.0/24`): `{"nbDeleted":"N"}` on 200.
    pub fn delete_decisions(&self, from: &Netns, token: &str, query: &str) -> Result<Response> {
        self.request(
            from,
            "DELETE",
            &format!("/v1/decisions?{query}"),
            &[
                ("User-Agent", USER_AGENT),
                ("Authorization", &format!("Bearer {token}")),
            ],
            None,
        )
    }

    /// `GET /v1/decisions/stream` (`?startup=true` for the whole state)
    /// with bouncer `key`: `{"new":[...]|null,"deleted":[...]|null}` on 200.
    pub fn stream(&self, from: &Netns, key: &str, startup: bool) -> Result<Response> {
        let path = if startup {
            "/v1/decisions/stream?startup=true"
        } else {
            "/v1/decisions/stream"
        };
        self.request(
            from,
            "GET",
            path,
            &[("User-Agent", USER_AGENT), ("X-Api-Key", key)],
            None,
        )
    }
}

impl Drop for Lapi {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && let Ok(None) = child.try_wait()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Debian's /etc/crowdsec/profiles.yaml, for when it is missing.
const DEFAULT_PROFILES: &str = "name: default_ip_remediation
filters:
 - Alert.Remediation == true && Alert.GetScope() == \"Ip\"
decisions:
 - type: ban
   duration: 4h
on_success: break
";

fn write_config(dir: &Path, listen: SocketAddr) -> Result<()> {
    for sub in ["hub", "data", "notifications"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let profiles = std::fs::read_to_string("/etc/crowdsec/profiles.yaml")
        .unwrap_or_else(|_| DEFAULT_PROFILES.to_string());
    std::fs::write(dir.join("profiles.yaml"), profiles).context("writing profiles.yaml")?;
    std::fs::write(
        dir.join("simulation.yaml"),
        "simulation: off\nexclusions: []\n",
    )
    .context("writing simulation.yaml")?;
    let d = dir.display();
    // No `online_client:` (no central API), no prometheus, logs on stdout.
    let config = format!(
        "common:
  daemonize: false
  log_media: stdout
  log_level: info
  working_dir: .
config_paths:
  config_dir: {d}/
  data_dir: {d}/data/
  simulation_path: {d}/simulation.yaml
  hub_dir: {d}/hub/
  index_path: {d}/hub/.index.json
  notification_dir: {d}/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
cscli:
  output: human
  color: false
db_config:
  log_level: info
  type: sqlite
  db_path: {d}/data/crowdsec.db
  use_wal: true
api:
  client:
    insecure_skip_verify: false
    credentials_path: {d}/local_api_credentials.yaml
  server:
    log_level: info
    listen_uri: {listen}
    profiles_path: {d}/profiles.yaml
prometheus:
  enabled: false
"
    );
    std::fs::write(dir.join("config.yaml"), config).context("writing config.yaml")
}

/// Every decision of a list of alerts (`cscli decisions list -o json`,
/// `GET /v1/alerts`); none for `null`.
pub fn alert_decisions(alerts: &Value) -> impl Iterator<Item = &Value> {
    alerts
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["decisions"].as_array().into_iter().flatten())
}

/// The decisions of a stream answer's `new` or `deleted` (`null`: none).
pub fn stream_list<'a>(stream: &'a Value, which: &str) -> Vec<&'a Value> {
    stream[which].as_array().into_iter().flatten().collect()
}

/// One alert as a watcher posts it, with every key LAPI 1.4.6 requires and
/// one `ban` decision (origin `ORIGIN`, scenario `SCENARIO`) on `scope`
/// (`Ip`, `Range`) `value` for `duration` (Go syntax: `1h`, `90m`). The
/// decision runs from `stop_at`.
pub fn ban_alert(scope: &str, value: &str, duration: &str, stop_at: SystemTime) -> Value {
    let at = humantime::format_rfc3339_seconds(stop_at).to_string();
    json!({
        "scenario": SCENARIO,
        "scenario_hash": "",
        "scenario_version": "0.1.0",
        "message": format!("spamdelay: early talker {value}"),
        "events_count": 1,
        "start_at": at,
        "stop_at": at,
        "capacity": 0,
        "leakspeed": "0",
        "simulated": false,
        "events": [],
        "source": { "scope": scope, "value": value },
        "decisions": [{
            "type": "ban",
            "duration": duration,
            "scope": scope,
            "value": value,
            "origin": ORIGIN,
            "scenario": SCENARIO,
        }],
    })
}

/// A Go duration as LAPI prints one (`59m59.731597643s`, `-10.64ms`,
/// `-1h0m5.98s`), in seconds.
pub fn go_duration(s: &str) -> Option<f64> {
    let (sign, mut rest) = match s.strip_prefix('-') {
        Some(r) => (-1.0, r),
        None => (1.0, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let (unit, len) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ms", 1e-3),
            ("h", 3600.0),
            ("m", 60.0),
            ("s", 1.0),
        ]
        .iter()
        .find(|(u, _)| rest.starts_with(u))
        .map(|(u, f)| (*f, u.len()))?;
        total += n * unit;
        rest = &rest[len..];
    }
    Some(sign * total)
}

/// Secret files the daemon reads (a machine's password, a bouncer's API
/// key), mode 0600 in a directory of their own, removed on drop. Each holds
/// the secret and a newline, as `echo SECRET > FILE` leaves it: the reader
/// must trim.
pub struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    pub fn new() -> Result<Self> {
        Ok(Secrets {
            dir: tempfile::tempdir().context("creating a directory for secrets")?,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `secret` and a newline in file `name`, mode 0600: its path.
    pub fn write(&self, name: &str, secret: &str) -> Result<PathBuf> {
        use std::io::Write;
        let path = self.dir.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        writeln!(f, "{secret}").with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Machine `id`'s password file (`ID.password`).
    pub fn password_file(&self, id: &str, password: &str) -> Result<PathBuf> {
        self.write(&format!("{id}.password"), password)
    }

    /// Bouncer `name`'s API key file (`NAME.key`).
    pub fn key_file(&self, name: &str, key: &str) -> Result<PathBuf> {
        self.write(&format!("{name}.key"), key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_as_lapi_prints_them() {
        let near = |s: &str, want: f64| {
            let got = go_duration(s).unwrap_or_else(|| panic!("{s} parses"));
            assert!((got - want).abs() < 1e-6, "{s}: {got} != {want}");
        };
        near("59m59.731597643s", 3599.731597643);
        near("-10.640311ms", -0.010640311);
        near("-1h0m5.983869631s", -3605.983869631);
        near("49m41.016249838s", 2981.016249838);
        near("1.5µs", 1.5e-6);
        near("0", 0.0);
        near("168h", 604800.0);
        assert_eq!(go_duration("1d"), None);
        assert_eq!(go_duration(""), Some(0.0));
        assert_eq!(go_duration("h"), None);
    }

    #[test]
    fn an_alert_has_every_key_lapi_requires() {
        let a = ban_alert("Ip", "198.51.100.10", "1h", SystemTime::UNIX_EPOCH);
        for key in [
            "scenario",
            "scenario_hash",
            "scenario_version",
            "message",
            "events_count",
            "start_at",
            "stop_at",
            "capacity",
            "leakspeed",
            "simulated",
            "events",
            "source",
        ] {
            assert!(!a[key].is_null(), "{key}");
        }
        assert_eq!(a["stop_at"], "1970-01-01T00:00:00Z");
        let d = &a["decisions"][0];
        for key in ["type", "duration", "scope", "value", "origin", "scenario"] {
            assert!(d[key].is_string(), "{key}");
        }
    }

    #[test]
    fn secrets_are_private_files() {
        let s = Secrets::new().unwrap();
        let p = s.key_file("mx-b", "abc").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "abc\n");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
