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
use std::os::unix::process::ExitStatusExt as _;
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
            .spawn();
        let mut child = started
            .with_context(|| format!("starting {}", self.exe.display()))
            .map_err(ChildError::Unavailable)?;
        let (stdin, stderr) = (child.stdin.take(), child.stderr.take());
        let deadline = Instant::now() + self.timeout;
        // The input is written and stderr read on threads of their own, so that neither a
        // child that stops reading nor one that writes a lot can block the wait, which gives
        // up at the deadline.
        let (status, stderr) = std::thread::scope(|scope| {
            scope.spawn(move || {
                if let Some(mut stdin) = stdin {
                    // A child that died early shows in its status.
                    let _ = stdin.write_all(bytes);
                }
            });
            let reader = scope.spawn(move || {
                let mut text = String::new();
                if let Some(mut stderr) = stderr {
                    let _ = stderr.read_to_string(&mut text);
                }
                text
            });
            let status = wait_until(&mut child, deadline);
            (status, reader.join().unwrap_or_default())
        });
        let status = match status {
            Ok(Some(status)) => status,
            Ok(None) => {
                return Err(ChildError::Rejected(format!(
                    "the compiler did not finish within {:?} and was stopped",
                    self.timeout
                )))
            }
            Err(e) => return Err(ChildError::Unavailable(e)),
        };
        if status.success() {
            return Ok(());
        }
        let said = tail(stderr.trim(), MAX_STDERR_BYTES);
        let ended = if said.is_empty() {
            format!("the compiler process {status}")
        } else {
            format!("{said} (the compiler process {status})")
        };
        match (status.code(), status.signal()) {
            (Some(code), _) if code == i32::from(EXIT_REFUSED) => {
                Err(ChildError::Rejected(said.to_string()))
            }
            // A panic (Rust's exit status 101) is the compiler's too: the child's own code
            // reports its errors without one.
            (Some(EXIT_PANICKED), _) => Err(ChildError::Rejected(format!(
                "the compiler panicked: {ended}"
            ))),
            (_, Some(signal)) if CRASH_SIGNALS.contains(&signal) => Err(ChildError::Rejected(
                format!("the compiler crashed: {ended}"),
            )),
            // An I/O error, a usage error (an upgraded executable), a stop signal: nothing
            // about the component.
            _ => Err(ChildError::Unavailable(anyhow::anyhow!(ended))),
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

/// Waits for `child` until `deadline`; past it, kills it and answers `None`.
fn wait_until(child: &mut Child, deadline: Instant) -> anyhow::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child
            .try_wait()
            .context("waiting for the compiler process")?
        {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Why a child compile gave no code.
#[derive(Debug)]
pub enum ChildError {
    /// The child could not be run, or failed for a reason that says nothing about the
    /// component (an I/O error, a usage error, a stop signal): the host compiles in its own
    /// process instead.
    Unavailable(anyhow::Error),
    /// The compiler refused the component, panicked or crashed on it, or ran past the timeout:
    /// what the child printed, or how it ended. Not retried in the host's process: a
    /// component that crashes the compiler must not crash the host.
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
    let compiled = match engine::precompile(tier, limits, &bytes) {
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
