//! A cache of compiled components, so a restarted host serves in milliseconds instead of
//! recompiling every plugin with cranelift (seconds each).
//!
//! An entry is named by the sha256 of the component's bytes and the engine's compatibility
//! hash (wasmtime version, compiler settings, target), so a changed plugin or a new host build
//! never loads a stale artifact. Entries are only ever written by this module (or the host's
//! child compiler, into a file this module names), into a directory it creates with mode 0700:
//! loading precompiled code is `unsafe` because it is trusted machine code, and the host must
//! never load bytes it did not produce itself.

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::compiler;
use super::engine::{return_freed_heap, Compile};

/// Where compiled components are kept.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    engine_hash: String,
}

impl CompileCache {
    /// A cache in `dir` (created 0700 if missing) for components compiled by `engine`.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<CompileCache> {
        std::fs::create_dir_all(dir)?;
        restrict_to_owner(dir)?;
        remove_stale_partials(dir);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache {
            dir: dir.to_path_buf(),
            engine_hash: format!("{:016x}", hasher.finish()),
        })
    }

    /// The sha256 of a component's bytes, hex.
    pub fn digest(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn entry(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{}.cwasm", self.engine_hash))
    }

    /// Whether the compiled code of the component `sha256` is here.
    pub fn contains(&self, sha256: &str) -> bool {
        self.entry(sha256).exists()
    }

    /// The compiled component for `bytes` (whose digest is `sha256`): from the cache if this
    /// host compiled it before, else compiled now (in a child process, if `compile` has one)
    /// and stored.
    pub(crate) fn load_or_compile(
        &self,
        compile: &Compile,
        bytes: &[u8],
        sha256: &str,
    ) -> anyhow::Result<Component> {
        let engine = &compile.engine;
        let entry = self.entry(sha256);
        if entry.exists() {
            // SAFETY: entries are written only by this module and by the host's child
            // compiler, from `precompile_component` of this engine configuration (the name
            // carries its compatibility hash), into a directory only our user can write.
            match unsafe { Component::deserialize_file(engine, &entry) } {
                Ok(component) => return Ok(component),
                Err(e) => {
                    tracing::warn!(entry = %entry.display(), error = %e, "compile cache entry unusable; recompiling")
                }
            }
        }
        if compile.has_child() {
            // The child writes beside the entry; the file becomes the entry once its code has
            // loaded, so a reader never sees half an entry.
            match partial_file(&self.dir) {
                Ok(partial) => {
                    let partial = partial.into_temp_path();
                    if let Some(component) = compile.in_child(bytes, &partial)? {
                        if let Err(e) = partial.persist(&entry) {
                            tracing::warn!(entry = %entry.display(), error = %e.error, "could not write the compile cache");
                        }
                        return Ok(component);
                    }
                }
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "no file for a child compiler's code; compiling in the host's process")
                }
            }
        }
        compile.count("host");
        let compiled = engine.precompile_component(bytes);
        return_freed_heap();
        let compiled = compiled.map_err(anyhow::Error::from)?;
        // SAFETY: `compiled` was produced just now by this engine.
        let component =
            unsafe { Component::deserialize(engine, &compiled) }.map_err(anyhow::Error::from)?;
        // The entry is written (and synced) off the reload's path: the new version serves
        // without waiting for the disk, and a host stopped before the write only compiles
        // again at its next start.
        let dir = self.dir.clone();
        let spawned = std::thread::Builder::new()
            .name("esi-cache-write".into())
            .spawn(move || {
                if let Err(e) = store(&dir, &entry, &compiled) {
                    tracing::warn!(entry = %entry.display(), error = %e, "could not write the compile cache");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start writing the compile cache");
        }
        Ok(component)
    }
}

/// Writes through a temporary file and a rename, so a reader never sees half an entry.
fn store(dir: &Path, entry: &Path, compiled: &[u8]) -> std::io::Result<()> {
    let mut tmp = partial_file(dir)?;
    tmp.write_all(compiled)?;
    tmp.as_file().sync_all()?;
    tmp.persist(entry).map_err(|e| e.error)?;
    Ok(())
}

/// How old a child compiler's partial file must be before the next host to open the cache
/// removes it: older than any compile can take, so it is no other host's compile in progress.
const PARTIAL_MAX_AGE: Duration = Duration::from_secs(2 * compiler::DEFAULT_TIMEOUT.as_secs());

/// How the names of files not yet renamed into entries begin.
const PARTIAL_PREFIX: &str = ".esi-partial-";

/// A new file in `dir` for an entry's bytes, renamed into the entry once complete.
fn partial_file(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .tempfile_in(dir)
}

/// Removes the partial files of compiles whose host died before it could rename them into
/// entries. Only files of this cache's own naming: the directory may be shared.
fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(PARTIAL_PREFIX)
        {
            continue;
        }
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok());
        if age.is_some_and(|age| age > PARTIAL_MAX_AGE) {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(file = %entry.path().display(), error = %e, "could not remove a stale partial compile");
            }
        }
    }
}

fn restrict_to_owner(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The default cache directory: `$XDG_CACHE_HOME/esi-host`, `~/.cache/esi-host`, or the
/// system temp directory as a last resort.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("esi-host")
}
