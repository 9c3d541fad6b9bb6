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
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;

use super::engine::{self, Limits, Tier};

/// The hidden subcommand of `esi-host` that compiles one component.
pub const SUBCOMMAND: &str = "compile-component";

/// Runs compiles in child processes of an `esi-host` executable.
#[derive(Debug, Clone)]
pub struct ChildCompiler {
    exe: PathBuf,
}

impl ChildCompiler {
    /// Compiles with `exe compile-component` (the host's own executable, normally).
    pub fn new(exe: PathBuf) -> ChildCompiler {
        ChildCompiler { exe }
    }

    /// The executable the children run.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Compiles `bytes` with the engine of `tier` under `limits` into `output` (created or
    /// truncated), as `Engine::precompile_component` would.
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
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = started
            .with_context(|| format!("starting {}", self.exe.display()))
            .map_err(ChildError::Start)?;
        if let Some(mut stdin) = child.stdin.take() {
            // The child reads all of its input before it writes anything, so this cannot
            // block on a full stderr pipe. A child that died early shows in its status below.
            let _ = stdin.write_all(bytes);
        }
        let finished = child
            .wait_with_output()
            .context("waiting for the compiler process")
            .map_err(ChildError::Start)?;
        if finished.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&finished.stderr);
        let message = stderr.trim();
        Err(ChildError::Rejected(if message.is_empty() {
            format!("the compiler process {}", finished.status)
        } else {
            message.to_string()
        }))
    }
}

/// Why a child compile gave no code.
#[derive(Debug)]
pub enum ChildError {
    /// The child could not be run: the host compiles in its own process instead.
    Start(anyhow::Error),
    /// The child ran and failed: what it printed (the compiler's error, normally), or how it
    /// ended. Not retried in the host's process: a component that crashes the compiler must
    /// not crash the host.
    Rejected(String),
}

/// The child's side: reads a component from stdin and writes its compiled code to `output`.
pub fn compile_stdin(tier: Tier, limits: &Limits, output: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading the component from stdin")?;
    let compiled = engine::precompile(tier, limits, &bytes)?;
    let mut file =
        std::fs::File::create(output).with_context(|| format!("creating {}", output.display()))?;
    file.write_all(&compiled)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}
