//! Compiling components in a child process.
//!
//! Cranelift allocates tens of MiB per component and frees it when done, but the allocator
//! keeps most of it: a host that compiled both bundled plugins in its own process stayed
//! ~80 MiB larger for the rest of its life (`BENCHMARKS.md`, item 23), and every hot reload
//! compiles twice. A compile in a child (`esi-host compile-component`, run from the host's
//! own executable) leaves the host only the compiled code, mapped from a file as a compile
//! cache hit is. It also keeps a component that makes the compiler fail badly (a crash, a
//! runaway allocation) from taking the daemon with it.
//!
//! The child gets the component's bytes on stdin, not its path: the file may be replaced
//! while it compiles (hot reload), and the code must be the code of the bytes the host hashed.

use std::io::{Read as _, Write as _};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::engine::{self, Limits, Tier};

/// The hidden subcommand of `esi-host` that compiles one component.
pub const SUBCOMMAND: &str = "compile-component";

/// How long a child may compile one component before it is stopped and the build rejected.
/// Cranelift takes about a second for each bundled plugin here; a component that keeps it
/// busy for minutes is not one to run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs compiles in child processes of an `esi-host` executable.
#[derive(Debug, Clone)]
pub struct ChildCompiler {
    exe: PathBuf,
    timeout: Duration,
}

impl ChildCompiler {
    /// Compiles with `exe compile-component` (the host's own executable, normally).
    pub fn new(exe: PathBuf) -> ChildCompiler {
        ChildCompiler {
            exe,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Stops a compile that takes longer than `timeout` ([`DEFAULT_TIMEOUT`] by default).
    pub fn with_timeout(mut self, timeout: Duration) -> ChildCompiler {
        self.timeout = timeout;
        self
    }

    /// The executable the children run.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Compiles `bytes` with the engine of `tier` under `limits` into `output` (created or
    /// truncated), as `Engine::precompile_component` would. A child that runs past the
    /// timeout is killed and the compile rejected.
    pub fn compile(
        &self,
        tier: Tier,
        limits: &Limits,
        bytes: &[u8],
        output: &Path,
    ) -> Result<(), ChildError> {
        let started = Command::new(&self.exe)
            .arg(SUBCOMMAND)
            .args(["--tier", tier.as_str()])
            .args(["--max-memory-bytes", &limits.max_memory_bytes.to_string()])
            .args(["--max-instances", &limits.max_instances.to_string()])
            .arg("--output")
            .arg(output)
            // A perf map of a process that runs no code is of no use.
            .env_remove(engine::PERF_MAP_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C meant for a host in a terminal reaches the host,
            // whose drain decides; the child dies with it (`PR_SET_PDEATHSIG`).
            .process_group(0)
            .spawn();
        let child = started
            .with_context(|| format!("starting {}", self.exe.display()))
            .map_err(ChildError::Unavailable)?;
        let mut child = Reaped(child);
        let (stdin, stderr) = (child.0.stdin.take(), child.0.stderr.take());
        let deadline = Instant::now().checked_add(self.timeout);
        // The input is written and stderr read on threads of their own, so that neither a
        // child that stops reading nor one that writes a lot can block the wait, which gives
        // up at the deadline. Should anything here fail or panic, `Reaped` kills the child.
        let waited = std::thread::scope(|scope| -> anyhow::Result<_> {
            std::thread::Builder::new()
                .name("esi-compile-in".into())
                .spawn_scoped(scope, move || {
                    if let Some(mut stdin) = stdin {
                        // A child that died early shows in its status.
                        let _ = stdin.write_all(bytes);
                    }
                })
                .context("starting a thread for the compiler's input")?;
            let reader = std::thread::Builder::new()
                .name("esi-compile-err".into())
                .spawn_scoped(scope, move || {
                    let mut said = Vec::new();
                    if let Some(mut stderr) = stderr {
                        let _ = stderr.read_to_end(&mut said);
                    }
                    said
                });
            let reader = match reader {
                Ok(reader) => reader,
                Err(e) => {
                    // Before the scope waits for the input's thread.
                    child.kill();
                    return Err(e).context("starting a thread for the compiler's errors");
                }
            };
            let status = wait_until(&mut child.0, deadline);
            if status.is_err() {
                child.kill();
            }
            Ok((status?, reader.join().unwrap_or_default()))
        });
        let (status, stderr) = waited.map_err(ChildError::Unavailable)?;
        let Some(status) = status else {
            return Err(ChildError::Rejected(format!(
                "the compiler did not finish within {:?} and was stopped",
                self.timeout
            )));
        };
        if status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&stderr);
        let said = tail(stderr.trim(), MAX_STDERR_BYTES);
        let ended = if said.is_empty() {
            format!("the compiler process {status}")
        } else {
            format!("{said} (the compiler process {status})")
        };
        match (status.code(), status.signal()) {
            (Some(code), _) if code == i32::from(EXIT_REFUSED) && !said.is_empty() => {
                Err(ChildError::Rejected(said.to_string()))
            }
            (Some(code), _) if code == i32::from(EXIT_REFUSED) => Err(ChildError::Rejected(ended)),
            // A panic (Rust's exit status 101) is the compiler's too: the child's own code
            // reports its errors without one.
            (Some(EXIT_PANICKED), _) => Err(ChildError::Rejected(format!(
                "the compiler panicked: {ended}"
            ))),
            (_, Some(signal)) if CRASH_SIGNALS.contains(&signal) => Err(ChildError::Rejected(
                format!("the compiler crashed: {ended}"),
            )),
            // Stopped, as every process of the service is when systemd stops it: the host is
            // going away, and compiling in it now would only hold its shutdown up.
            (_, Some(signal)) if STOP_SIGNALS.contains(&signal) => Err(ChildError::Rejected(
                format!("the compiler was stopped: {ended}"),
            )),
            // An I/O error, a usage error (an upgraded executable): nothing about the
            // component.
            _ => Err(ChildError::Unavailable(anyhow::anyhow!(ended))),
        }
    }
}

/// A child process that is killed and reaped when dropped unless it was waited for: no path
/// out of [`ChildCompiler::compile`], an error or a panic included, leaves it running or a
/// zombie.
struct Reaped(Child);

impl Reaped {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Exit status of a child whose compiler refused the component.
pub const EXIT_REFUSED: u8 = 3;

/// Exit status of a Rust program that panicked.
const EXIT_PANICKED: i32 = 101;

/// Signals a compiler dies of when the input breaks it (or, for SIGKILL, when it ran out of
/// memory): the component is rejected rather than compiled again in the host.
const CRASH_SIGNALS: [i32; 6] = [
    libc::SIGSEGV,
    libc::SIGABRT,
    libc::SIGILL,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGKILL,
];

/// Signals that stop a process rather than report a fault.
const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The most of a child's stderr kept in an error (its end, where the error is).
const MAX_STDERR_BYTES: usize = 4096;

/// The last `max` bytes of `text`, at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Waits for `child` until `deadline` (none: for as long as it runs); past it, kills it and
/// answers `None`, unless it had finished after all.
fn wait_until(child: &mut Child, deadline: Option<Instant>) -> anyhow::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child
            .try_wait()
            .context("waiting for the compiler process")?
        {
            return Ok(Some(status));
        }
        let now = Instant::now();
        let left = deadline.map(|d| d.saturating_duration_since(now));
        if left == Some(Duration::ZERO) {
            let _ = child.kill();
            let status = child.wait().context("waiting for the compiler process")?;
            return Ok(status.success().then_some(status));
        }
        std::thread::sleep(left.map_or(pause, |left| pause.min(left)));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Why a child compile gave no code.
#[derive(Debug)]
pub enum ChildError {
    /// The child could not be run, or failed for a reason that says nothing about the
    /// component (an I/O error, a usage error): the host compiles in its own process instead.
    Unavailable(anyhow::Error),
    /// The compiler refused the component, panicked or crashed on it, ran past the timeout or
    /// was stopped by a signal: what the child printed, or how it ended. Not retried in the
    /// host's process: a component that crashes the compiler must not crash the host.
    Rejected(String),
}

/// The executable a host's children run: the very file this process runs (`/proc/self/exe`),
/// even after an upgrade has replaced the one at its path.
pub fn own_executable() -> Option<PathBuf> {
    let this = PathBuf::from("/proc/self/exe");
    if this.exists() {
        return Some(this);
    }
    std::env::current_exe().ok()
}

/// The child's side (`esi-host compile-component`): reads a component from stdin, writes its
/// compiled code to `output` and answers the exit status: 0, [`EXIT_REFUSED`] when the
/// compiler refused the component, 1 for anything else. Errors go to stderr, for the host.
pub fn child_main(tier: Tier, limits: &Limits, output: &Path) -> u8 {
    #[cfg(target_os = "linux")]
    // SAFETY: `prctl(PR_SET_PDEATHSIG)` only sets this process's own death signal: a child
    // whose host died stops instead of compiling for nobody.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("reading the component from stdin: {e}");
        return 1;
    }
    // An engine that cannot be created says nothing about the component: exit 1.
    let engine = match engine::compiler_engine(tier, limits) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("{e:#}");
            return 1;
        }
    };
    let compiled = match engine.precompile_component(&bytes) {
        Ok(compiled) => compiled,
        Err(e) => {
            eprintln!("{e:#}");
            return EXIT_REFUSED;
        }
    };
    let written = std::fs::File::create(output).and_then(|mut file| {
        file.write_all(&compiled)?;
        file.sync_all()
    });
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("writing {}: {e}", output.display());
            1
        }
    }
}
