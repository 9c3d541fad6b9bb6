//! How a host's loader copes with its child compiler failing (`plugins/compiler.rs`). A test
//! binary of its own, and one test at a time: the tests count compiles by process in the
//! process-wide metrics, which no other test may move meanwhile.
//! (`tests/tiers.rs` checks that code from a child compiler runs under the same sandbox.)

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use esi_host::plugins::compiler::ChildCompiler;
use esi_host::plugins::manifest::Manifest;
use esi_host::plugins::{Limits, PluginEngine, Tier};
use esi_tests::scripted::HANDLER;
use esi_tests::{host_binary, plugin_compiles, test_plugin_dir};
use tokio::sync::Mutex;

/// Held by each test for its whole run.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A component the child compiler rejects fails its load with the compiler's own error and
/// leaves nothing in the cache; it is not compiled again in the host's process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_the_child_compiler_rejects_fails_its_load_with_the_compilers_error() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cache = tempfile::tempdir().unwrap();
    let engine = PluginEngine::new(Limits::default(), Some(cache.path()))
        .unwrap()
        .with_child_compiler(ChildCompiler::new(host_binary()));
    let path = Path::new("/plugins/broken.wasm");
    let bytes: Arc<[u8]> = Arc::from(&b"\0asm\x0d\0\x01\0 but truncated"[..]);
    for tier in [Tier::Baseline, Tier::Optimized] {
        let before = plugin_compiles(tier, "host");
        let err = engine
            .load_bytes(path, bytes.clone(), Manifest::default(), tier)
            .await
            .unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("/plugins/broken.wasm is not a valid WebAssembly component"),
            "{tier:?}: {message}"
        );
        // The compiler's reason, from the child's stderr.
        assert!(
            message.contains("failed to parse WebAssembly module")
                || message.contains("unexpected end"),
            "{tier:?}: {message}"
        );
        assert_eq!(
            plugin_compiles(tier, "host"),
            before,
            "{tier:?}: compiled again in the host"
        );
    }
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

/// A stand-in compiler: a shell script in `dir` that reads its input and runs `body`.
fn stand_in(dir: &Path, name: &str, body: &str) -> PathBuf {
    let script = dir.join(name);
    // No core file from the crash signals below.
    std::fs::write(
        &script,
        format!("#!/bin/sh\nulimit -c 0\ncat > /dev/null\n{body}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// A child compiler that cannot be started (a host binary moved away under a running host,
/// say), or that fails for a reason that is not the component's (here: one that exits 1, as
/// the child does on an I/O error), is logged and the compile is done in the host's process:
/// the plugin still loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_compiler_that_cannot_compile_leaves_the_compile_to_the_host() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = test_plugin_dir().join(format!("{HANDLER}.wasm"));
    let exits_1 = stand_in(
        dir.path(),
        "exits-1",
        "echo 'writing the output: disk full' >&2; exit 1",
    );
    for exe in [PathBuf::from("/nonexistent/esi-host"), exits_1] {
        let engine = PluginEngine::new(Limits::default(), None)
            .unwrap()
            .with_child_compiler(ChildCompiler::new(exe.clone()));
        let before = (
            plugin_compiles(Tier::Baseline, "child"),
            plugin_compiles(Tier::Baseline, "host"),
        );
        let plugin = engine.load_tier(&path, Tier::Baseline).await.unwrap();
        assert_eq!(plugin.tier, Tier::Baseline);
        assert_eq!(
            (
                plugin_compiles(Tier::Baseline, "child"),
                plugin_compiles(Tier::Baseline, "host")
            ),
            (before.0, before.1 + 1),
            "{}",
            exe.display()
        );
    }
}

/// A compile that runs past its timeout is stopped and the build rejected, not compiled again
/// in the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_past_its_timeout_is_stopped_and_rejected() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let compiler = ChildCompiler::new(host_binary()).with_timeout(Duration::from_millis(1));
    let engine = PluginEngine::new(Limits::default(), None)
        .unwrap()
        .with_child_compiler(compiler);
    let path = test_plugin_dir().join(format!("{HANDLER}.wasm"));
    let before = plugin_compiles(Tier::Optimized, "host");
    let err = engine.load_tier(&path, Tier::Optimized).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("the compiler did not finish within 1ms and was stopped"),
        "{message}"
    );
    assert_eq!(plugin_compiles(Tier::Optimized, "host"), before);
}

/// A host that died while its child compiled leaves a partial file in the cache; the next
/// host to open the cache removes it once it is older than any compile can take, and leaves
/// a recent one (another host's compile in progress) alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_partial_compiles_are_removed_from_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let stale = cache.path().join(".esi-partial-Stale1");
    let recent = cache.path().join(".esi-partial-Recent");
    let entry = cache.path().join("0123-4567.cwasm");
    // Another program's temporary file, in a cache directory an operator shared.
    let foreign = cache.path().join(".tmpOther");
    for file in [&stale, &recent, &entry, &foreign] {
        std::fs::write(file, b"compiled code").unwrap();
    }
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    for file in [&stale, &entry, &foreign] {
        std::fs::File::options()
            .write(true)
            .open(file)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
    }
    let _engine = PluginEngine::new(Limits::default(), Some(cache.path())).unwrap();
    assert!(!stale.exists());
    assert!(recent.exists());
    assert!(entry.exists());
    assert!(foreign.exists());
}

/// A compiler that panics (exit status 101), dies of a crash signal or is stopped (systemd
/// stops every process of the service) rejects the build: the component is not compiled
/// again in the host, where it could take the daemon down or hold its shutdown up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compiler_that_panics_crashes_or_is_stopped_rejects_the_build() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = test_plugin_dir().join(format!("{HANDLER}.wasm"));
    let endings = [
        (
            "panics",
            "echo 'thread main panicked' >&2; exit 101",
            "the compiler panicked",
        ),
        ("segfaults", "kill -SEGV $$", "the compiler crashed"),
        ("is-stopped", "kill -TERM $$", "the compiler was stopped"),
    ];
    for (name, body, expected) in endings {
        let engine = PluginEngine::new(Limits::default(), None)
            .unwrap()
            .with_child_compiler(ChildCompiler::new(stand_in(dir.path(), name, body)));
        let before = plugin_compiles(Tier::Baseline, "host");
        let err = engine.load_tier(&path, Tier::Baseline).await.unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains(expected), "{name}: {message}");
        assert_eq!(plugin_compiles(Tier::Baseline, "host"), before, "{name}");
    }
}
