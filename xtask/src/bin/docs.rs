//! `xtask-docs OUT_DIR`: spamdelay's man pages (section 8, one per
//! subcommand) and bash/zsh/fish completions, from the CLI's own clap
//! definition, for the Debian package. `cargo xtask deb` runs it.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use flate2::{Compression, GzBuilder};
use spamdelay::cli::Cli;

/// An admin daemon: System Administration commands.
const SECTION: &str = "8";

/// Appended to `spamdelay(8)`: where things are, for the admin reading it.
const MAIN_PAGE_TAIL: &str = r#".SH FILES
.TP
\fI/etc/spamdelay/spamdelay.toml\fR
Settings for \fBrun\fR: its flags as keys, read when it exists (see \fBspamdelay-run\fR(8)).
.TP
\fI/var/lib/spamdelay\fR
The ban register and the daemon's status (\fB\-\-state\-dir\fR).
.TP
\fI/sys/fs/bpf/spamdelay\fR
The pinned programs and kernel state (\fB\-\-pin\-dir\fR); \fBspamdelay detach\fR removes them.
.TP
\fI/usr/lib/systemd/system/spamdelay.service\fR
The systemd unit: \fBsystemctl start|reload|stop spamdelay\fR; its log: \fBjournalctl \-u spamdelay\fR.
.SH "SEE ALSO"
\fBnft\fR(8), \fBsystemctl\fR(1), \fBjournalctl\fR(1)
"#;

/// Appended to each subcommand's page.
const SUBCOMMAND_PAGE_TAIL: &str = ".SH \"SEE ALSO\"\n\\fBspamdelay\\fR(8)\n";

fn main() -> std::process::ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: xtask-docs OUT_DIR");
        return std::process::ExitCode::FAILURE;
    };
    match generate(&out) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask-docs: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn generate(out: &Path) -> Result<()> {
    let man_dir = out.join("man");
    // Afresh, so a subcommand that is gone leaves no page behind.
    if man_dir.exists() {
        fs::remove_dir_all(&man_dir).with_context(|| format!("clearing {}", man_dir.display()))?;
    }
    fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    // Built, so subcommands see the global flags and are named `spamdelay-run`.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let source = format!("spamdelay {}", env!("CARGO_PKG_VERSION"));
    let page = |cmd: clap::Command, tail: &str| -> Result<()> {
        let man = clap_mangen::Man::new(cmd)
            .section(SECTION)
            .source(source.as_str())
            .manual("System Manager's Manual");
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        roff.extend_from_slice(tail.as_bytes());
        write_gz(&man_dir.join(format!("{}.gz", man.get_filename())), &roff)
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(sub.clone(), SUBCOMMAND_PAGE_TAIL)?;
    }
    page(cmd.clone(), MAIN_PAGE_TAIL)?;

    let completions = out.join("completions");
    fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    for (shell, file) in [
        (Shell::Bash, "spamdelay.bash"),
        (Shell::Zsh, "_spamdelay"),
        (Shell::Fish, "spamdelay.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "spamdelay", &mut script);
        let path = completions.join(file);
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// gzip as Debian policy wants man pages: best compression, no name, no time,
/// so the package is reproducible.
fn write_gz(path: &Path, data: &[u8]) -> Result<()> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut gz = GzBuilder::new().write(file, Compression::best());
    gz.write_all(data)
        .and_then(|()| gz.finish().map(drop))
        .with_context(|| format!("writing {}", path.display()))
}
