//! The plugin registry on its own (real components, no etcd): what a hot reload keeps and
//! what it lets go of.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use esi_host::plugins::{Limits, PluginEngine, PluginRegistry};
use esi_tests::scripted::{HANDLER, TIMEOUT};
use esi_tests::{component_variant, plugin_dir_with_copies, replace_file, test_plugin_dir};
use tokio_util::sync::CancellationToken;

fn manifest(handlers: &[&str], max_instances: u32) -> String {
    format!(
        "[plugin]\nhandlers = {handlers:?}\n\n[capabilities]\nread = [\"/state/\"]\n\n\
         [limits]\nmax_instances = {max_instances}\n"
    )
}

/// A directory with the scripted guest copied as each of `names`, under the given manifests.
fn scripted_copies(plugins: &[(&str, String)]) -> PathBuf {
    let dir = plugin_dir_with_copies(&[test_plugin_dir()], &[HANDLER]);
    let original = dir.join(format!("{HANDLER}.wasm"));
    for (name, manifest) in plugins {
        std::fs::copy(&original, dir.join(format!("{name}.wasm"))).unwrap();
        std::fs::write(dir.join(format!("{name}.toml")), manifest).unwrap();
    }
    std::fs::remove_file(&original).unwrap();
    std::fs::remove_file(dir.join(format!("{HANDLER}.toml"))).unwrap();
    dir
}

async fn registry_on(dir: &Path) -> Arc<PluginRegistry> {
    let engine = Arc::new(PluginEngine::new(Limits::default(), None).unwrap());
    Arc::new(PluginRegistry::load_dir(engine, dir).await.unwrap())
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Jobs still running on the old version hold instance slots: the new version shares them,
/// so old and new together stay within `max_instances`. A new limit gets fresh slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_build_shares_the_instance_slots_of_the_one_it_replaces() {
    let dir = scripted_copies(&[("a", manifest(&[HANDLER], 2))]);
    let component = dir.join("a.wasm");
    let original = std::fs::read(&component).unwrap();
    let registry = registry_on(&dir).await;
    let old = registry.get(HANDLER).unwrap();
    let _running = old.slots.clone().try_acquire_owned().unwrap();

    replace_file(&component, &component_variant(&original, 1));
    registry.reload("a").await;
    let new = registry.get(HANDLER).unwrap();
    assert_ne!(new.sha256, old.sha256, "the new build serves");
    assert!(Arc::ptr_eq(&new.slots, &old.slots));
    assert_eq!(
        new.slots.available_permits(),
        1,
        "the old build's running job counts"
    );

    replace_file(&dir.join("a.toml"), manifest(&[HANDLER], 3).as_bytes());
    registry.reload("a").await;
    let resized = registry.get(HANDLER).unwrap();
    assert!(!Arc::ptr_eq(&resized.slots, &old.slots));
    assert_eq!(resized.slots.available_permits(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rejected file put back to the build that serves clears the `rejected` state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_file_put_back_to_the_serving_build_is_active_again() {
    let dir = scripted_copies(&[("a", manifest(&[HANDLER], 2))]);
    let component = dir.join("a.wasm");
    let original = std::fs::read(&component).unwrap();
    let registry = registry_on(&dir).await;
    assert_eq!(registry.status("a").unwrap().state, "active");

    replace_file(&component, b"not a component");
    registry.reload("a").await;
    let state = registry.status("a").unwrap().state;
    assert!(state.starts_with("rejected: "), "{state}");

    replace_file(&component, &original);
    registry.reload("a").await;
    assert_eq!(registry.status("a").unwrap().state, "active");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A deploy that moves a handler to a plugin under a new name (`a.wasm` added, `b.wasm` that
/// served it removed): whichever file the watch looks at first, the handler ends up with the
/// new plugin (rejected while the handler was still taken, it is tried again once it is free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_moved_to_a_plugin_under_a_new_name_in_one_deploy_is_served_by_it() {
    let dir = scripted_copies(&[("b", manifest(&[HANDLER], 2))]);
    let registry = registry_on(&dir).await;
    let shutdown = CancellationToken::new();
    let watch = tokio::spawn(registry.clone().watch(shutdown.clone()));
    eventually("the watch catches up", || registry.checks() >= 2).await;

    // `a` is looked at first (names are taken in order), while `b` still serves the handler.
    let b = dir.join("b.wasm");
    let staged = dir.join(".a.wasm.tmp");
    std::fs::copy(&b, &staged).unwrap();
    std::fs::write(dir.join("a.toml"), manifest(&[HANDLER], 2)).unwrap();
    std::fs::rename(&staged, dir.join("a.wasm")).unwrap();
    std::fs::remove_file(dir.join("b.toml")).unwrap();
    std::fs::remove_file(&b).unwrap();
    eventually("the handler is served by a", || {
        registry.get(HANDLER).is_some_and(|p| p.name == "a")
    })
    .await;
    eventually("a is active", || {
        registry.status("a").is_some_and(|s| s.state == "active")
    })
    .await;
    assert!(registry.status("b").is_none());
    shutdown.cancel();
    watch.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
