//! The test lab: network namespaces and veth pairs behind RAII guards, a
//! pausing SMTP test server, clients of every kind, crafted packets, and the
//! daemon run as a child process. Used by `tests/tests/*.rs`, the demo and
//! the benchmark.

pub mod bench;
pub mod crowdsec;
pub mod daemon;
pub mod fail2ban;
pub mod flood;
pub mod http;
pub mod lab;
pub mod mta;
pub mod nft;
pub mod nlmon;
pub mod packet;
pub mod prometheus;
pub mod raw;
pub mod scenario;
pub mod smtp;

/// True when the test may run privileged work. Without root it prints a loud
/// SKIP and returns false, except under CI (`CI` set), where a skip fails.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: privileged test cannot run without root, and CI forbids skipping it");
    }
    eprintln!(
        "\n!!!!! SKIPPED {test}: needs root (network namespaces, eBPF). Run `cargo xtask test` as root. !!!!!\n"
    );
    false
}

/// Polls `done` every 50 ms for up to `limit`; whether it came true.
pub fn until(limit: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    done()
}

/// A value that some threads change while others wait for it to hold
/// something: a daemon's log, what `nft monitor` printed, what a test
/// server heard.
#[derive(Default)]
pub struct Watched<T> {
    value: std::sync::Mutex<T>,
    changed: std::sync::Condvar,
}

impl<T> Watched<T> {
    /// Changes the value and wakes every waiter.
    pub fn update(&self, f: impl FnOnce(&mut T)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.lock())
    }

    /// Waits up to `timeout` for `find` to find something in the value.
    pub fn wait_for<R>(
        &self,
        timeout: std::time::Duration,
        mut find: impl FnMut(&T) -> Option<R>,
    ) -> Option<R> {
        let deadline = std::time::Instant::now() + timeout;
        let mut value = self.lock();
        loop {
            if let Some(found) = find(&value) {
                return Some(found);
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            value = self
                .changed
                .wait_timeout(value, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A panicking test thread must not hide the value from the others.
    fn lock(&self) -> std::sync::MutexGuard<'_, T> {
        self.value.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts one thread per output pipe of `child` (stdout, stderr) that hands
/// each line to `each`, with the moment it arrived.
pub fn read_lines(
    child: &mut std::process::Child,
    each: impl Fn(String, std::time::Instant) + Send + Sync + 'static,
) {
    use std::io::BufRead;
    let each = std::sync::Arc::new(each);
    let pipes: [Option<Box<dyn std::io::Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ];
    for pipe in pipes.into_iter().flatten() {
        let each = each.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                each(line, std::time::Instant::now());
            }
        });
    }
}
