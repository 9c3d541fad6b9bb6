//! Hot reload: how long from renaming a new component into the plugin directory until the
//! host serves it.
//!
//! The new component is the shipped one with a custom section appended (different bytes, same
//! behaviour), written under a temporary name and renamed over the old file, the supported
//! way to update a plugin. The clock runs from the rename until `PluginRegistry::status` shows
//! the new sha256 as active. That is two figures, because the compile cache decides the cost:
//! a build the host has never seen is compiled with cranelift; a build it compiled before (a
//! roll-back) is loaded from the cache.
//!
//! The host of this phase has a private plugin directory and a private compile cache, so the
//! one-off builds never land in the operator's cache.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use super::stats::ms;
use crate::host::{Host, HostConfig};
use crate::plugins::cache::CompileCache;

/// The plugin the phase reloads.
const PLUGIN: &str = "monitoring_worker";

/// Longest wait for a reload before the phase gives up.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// The host starts following its plugin directory in a task spawned at the end of
/// `Host::start`, and a change made before that task has registered its watch is never seen
/// (until the next change). The phase waits this long after the start...
const WATCH_SETTLE: Duration = Duration::from_secs(1);

/// ...and renames the same bytes again if nothing was served after this long, counting how
/// often it had to (`renames` > 1 means the timing includes a missed event).
const RENAME_AGAIN_AFTER: Duration = Duration::from_secs(15);

/// What the reload phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct Reload {
    pub plugin: String,
    /// Rename to serving, for bytes this host never compiled (baseline code first).
    pub new_build_ms: f64,
    /// Rename to serving that build's optimised (Cranelift) code.
    pub new_build_optimized_ms: f64,
    /// Rename to serving, for bytes it compiled before (from the compile cache).
    pub known_build_ms: f64,
    /// Renames it took for each (1 unless the host missed the first event).
    pub renames: [u32; 2],
}

/// Starts a worker-only host on a copy of the plugin and times two replacements.
pub async fn measure(
    endpoint: &str,
    root: &str,
    plugin_dir: &Path,
    child_compiler: Option<&Path>,
) -> anyhow::Result<Reload> {
    let dir = tempfile::Builder::new()
        .prefix("esi-bench-plugins-")
        .tempdir()
        .context("creating the reload phase's plugin directory")?;
    let cache = tempfile::Builder::new()
        .prefix("esi-bench-compile-cache-")
        .tempdir()
        .context("creating the reload phase's compile cache")?;
    // The manifest goes along: it grants the plugin its reads and sets its limits.
    for ext in ["wasm", "toml"] {
        let from = plugin_dir.join(format!("{PLUGIN}.{ext}"));
        let to = dir.path().join(format!("{PLUGIN}.{ext}"));
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    let original = std::fs::read(dir.path().join(format!("{PLUGIN}.wasm")))
        .context("reading the copied component")?;
    let mut config = HostConfig::new(vec![endpoint.to_string()], dir.path().to_path_buf());
    config.key_root = root.to_string();
    config.host_id = "bench-reload".into();
    config.run_manager = false;
    config.compile_cache = Some(cache.path().to_path_buf());
    config.child_compiler = child_compiler.map(Path::to_path_buf);
    let host = Host::start(config)
        .await
        .context("starting the reload phase's host")?;
    tokio::time::sleep(WATCH_SETTLE).await;
    let result = replace_twice(&host, dir.path(), &original).await;
    host.shutdown().await;
    result
}

async fn replace_twice(host: &Host, dir: &Path, original: &[u8]) -> anyhow::Result<Reload> {
    let payload = format!("esi-host bench reload {}", uuid::Uuid::new_v4());
    let new_build = with_custom_section(original, "esi-bench", payload.as_bytes());
    let (new_build_time, new_renames) = replace(host, dir, &new_build).await?;
    let optimized_time = until_optimized(host, &CompileCache::digest(&new_build)).await?;
    // Back to the original, which the host compiled when it started.
    let (known_build_time, known_renames) = replace(host, dir, original).await?;
    Ok(Reload {
        plugin: PLUGIN.to_string(),
        new_build_ms: ms(new_build_time),
        new_build_optimized_ms: ms(new_build_time + optimized_time),
        known_build_ms: ms(known_build_time),
        renames: [new_renames, known_renames],
    })
}

/// Writes `bytes` under a temporary name, renames it over the plugin and waits until the
/// host serves them. Returns the time from the first rename and the renames made.
async fn replace(host: &Host, dir: &Path, bytes: &[u8]) -> anyhow::Result<(Duration, u32)> {
    let sha256 = CompileCache::digest(bytes);
    let temporary = write_temporary(dir, bytes)?;
    let started = Instant::now();
    rename_over(dir, &temporary)?;
    let (mut renames, mut last_rename) = (1, started);
    loop {
        if last_rename.elapsed() > RENAME_AGAIN_AFTER {
            let temporary = write_temporary(dir, bytes)?;
            rename_over(dir, &temporary)?;
            renames += 1;
            last_rename = Instant::now();
        }
        if let Some(status) = host.plugins().status(PLUGIN) {
            if status.sha256 == sha256 && status.state == "active" {
                return Ok((started.elapsed(), renames));
            }
            if status.state.starts_with("rejected") {
                bail!("the host rejected the reloaded {PLUGIN}: {}", status.state);
            }
        }
        if started.elapsed() > RELOAD_TIMEOUT {
            bail!("the host did not serve the new {PLUGIN} within {RELOAD_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// How much longer until the build `sha256` serves optimised code.
async fn until_optimized(host: &Host, sha256: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let status = host.plugins().status(PLUGIN);
        match status {
            Some(s) if s.sha256 == sha256 && s.tier == "optimized" => return Ok(started.elapsed()),
            Some(s) if s.sha256 != sha256 => bail!("{PLUGIN} was replaced while it compiled"),
            _ => {}
        }
        if started.elapsed() > RELOAD_TIMEOUT {
            bail!("the optimised code of {PLUGIN} did not serve within {RELOAD_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Writes `bytes` under a name the host ignores; returns that path.
fn write_temporary(dir: &Path, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let temporary = dir.join(format!(".{PLUGIN}.wasm.tmp"));
    std::fs::write(&temporary, bytes)
        .with_context(|| format!("writing {}", temporary.display()))?;
    Ok(temporary)
}

/// Renames `temporary` over the plugin's component.
fn rename_over(dir: &Path, temporary: &Path) -> anyhow::Result<()> {
    let target = dir.join(format!("{PLUGIN}.wasm"));
    std::fs::rename(temporary, &target)
        .with_context(|| format!("renaming {} to {}", temporary.display(), target.display()))
}

/// `component` with a custom section appended: id 0, LEB128 size, LEB128 name length, name,
/// payload. Engines ignore custom sections, so the component behaves the same.
pub fn with_custom_section(component: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    let mut content = leb128(name.len());
    content.extend_from_slice(name.as_bytes());
    content.extend_from_slice(payload);
    let mut out = Vec::with_capacity(component.len() + content.len() + 6);
    out.extend_from_slice(component);
    out.push(0);
    out.extend(leb128(content.len()));
    out.extend(content);
    out
}

/// Unsigned LEB128.
fn leb128(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leb128_matches_the_wasm_spec_example() {
        assert_eq!(leb128(624_485), vec![0xE5, 0x8E, 0x26]);
        assert_eq!(leb128(0), vec![0]);
        assert_eq!(leb128(127), vec![0x7f]);
        assert_eq!(leb128(128), vec![0x80, 0x01]);
    }

    #[test]
    fn a_custom_section_is_appended_after_the_component() {
        let out = with_custom_section(b"\0asm", "n", b"xy");
        assert_eq!(out, b"\0asm\x00\x04\x01nxy");
    }
}
