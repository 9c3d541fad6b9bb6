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

/// Deploys a copy of the component of `from` as the plugin `name`, with its manifest, the
/// supported way: the manifest, then the component under a temporary name renamed into place.
fn deploy_copy(dir: &Path, from: &str, name: &str) {
    let staged = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::copy(dir.join(format!("{from}.wasm")), &staged).unwrap();
    std::fs::write(dir.join(format!("{name}.toml")), manifest(&[HANDLER], 2)).unwrap();
    std::fs::rename(&staged, dir.join(format!("{name}.wasm"))).unwrap();
}

fn remove_plugin(dir: &Path, name: &str) {
    std::fs::remove_file(dir.join(format!("{name}.toml"))).unwrap();
    std::fs::remove_file(dir.join(format!("{name}.wasm"))).unwrap();
}

/// Waits until `name` serves the scripted handler and its status says active.
async fn serves_and_is_active(registry: &PluginRegistry, name: &str) {
    eventually(&format!("the handler is served by {name}"), || {
        registry.get(HANDLER).is_some_and(|p| p.name == name)
    })
    .await;
    eventually(&format!("{name} is active"), || {
        registry.status(name).is_some_and(|s| s.state == "active")
    })
    .await;
}

/// The registry's directory watch, running once it has caught up with the directory.
struct Watching {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Watching {
    async fn start(registry: &Arc<PluginRegistry>) -> Watching {
        let checked = registry.checks();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(registry.clone().watch(shutdown.clone()));
        // The catch-up looks at each plugin once more.
        let plugins = registry.statuses().len() as u64;
        eventually("the watch catches up", || {
            registry.checks() >= checked + plugins
        })
        .await;
        Watching { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

fn rejections(plugin: &str) -> u64 {
    esi_host::metrics::global()
        .plugin_rejections
        .get_or_create(&esi_host::metrics::labels([("plugin", plugin)]))
        .get()
}

/// A deploy that moves a handler to a plugin under a new name (`incoming.wasm` added,
/// `outgoing.wasm` that served it removed): whichever file the watch looks at first, the
/// handler ends up with the new plugin, and no rejection is logged or counted on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_moved_to_a_plugin_under_a_new_name_in_one_deploy_is_served_by_it() {
    let dir = scripted_copies(&[("outgoing", manifest(&[HANDLER], 2))]);
    let registry = registry_on(&dir).await;
    let watch = Watching::start(&registry).await;

    // `incoming` is looked at first (names are taken in order, and its files change first),
    // while `outgoing` still serves the handler.
    deploy_copy(&dir, "outgoing", "incoming");
    remove_plugin(&dir, "outgoing");
    serves_and_is_active(&registry, "incoming").await;
    assert!(registry.status("outgoing").is_none());
    assert_eq!(rejections("incoming"), 0);
    watch.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plugin whose handler another plugin keeps serving is rejected once, saying which; other
/// plugins' deploys do not load it again or count it again; it serves as soon as the handler
/// is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_whose_handler_stays_taken_is_rejected_once_and_serves_once_it_is_free() {
    let dir = scripted_copies(&[("holder", manifest(&[HANDLER], 2))]);
    let registry = registry_on(&dir).await;
    let watch = Watching::start(&registry).await;

    let holder = dir.join("holder.wasm");
    let original = std::fs::read(&holder).unwrap();
    deploy_copy(&dir, "holder", "squatter");
    eventually("squatter is rejected", || {
        registry
            .status("squatter")
            .is_some_and(|s| s.state.contains("is already served by"))
    })
    .await;
    assert_eq!(rejections("squatter"), 1);

    // A new build of the holder changes the serving set but frees nothing.
    let first_build = registry.get(HANDLER).unwrap().sha256.clone();
    replace_file(&holder, &component_variant(&original, 1));
    eventually("the holder's new build serves", || {
        registry
            .get(HANDLER)
            .is_some_and(|p| p.name == "holder" && p.sha256 != first_build)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rejections("squatter"), 1);
    assert!(registry.get(HANDLER).is_some_and(|p| p.name == "holder"));

    // The holder goes: the squatter serves.
    remove_plugin(&dir, "holder");
    serves_and_is_active(&registry, "squatter").await;
    assert_eq!(rejections("squatter"), 1);
    watch.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plugin refused because another plugin holds its handler names the plugin that holds
/// it now, also after the holder was replaced by a third plugin taking the same handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_names_the_handlers_holder_after_the_holder_is_replaced() {
    let dir = scripted_copies(&[("incumbent", manifest(&[HANDLER], 2))]);
    let registry = registry_on(&dir).await;
    let watch = Watching::start(&registry).await;
    let names = |holder: &str| {
        let holder = dir.join(format!("{holder}.wasm")).display().to_string();
        move |state: &str| state.contains("is already served by") && state.ends_with(&holder)
    };
    deploy_copy(&dir, "incumbent", "usurper");
    let held_by_incumbent = names("incumbent");
    eventually("usurper is rejected, naming the incumbent", || {
        registry
            .status("usurper")
            .is_some_and(|s| held_by_incumbent(&s.state))
    })
    .await;
    // It never ran, so it exports no call-duration series (empty ones would read as a
    // plugin that serves but gets no jobs).
    let page = esi_host::metrics::global().encode();
    let series = page
        .lines()
        .find(|line| line.contains("_duration_seconds") && line.contains("plugin=\"usurper\""));
    assert_eq!(series, None, "a refused plugin's call series");

    // One deploy replaces the incumbent with `heir`, which takes the handler first (the freed
    // handler goes to the first blocked plugin by name, and "heir" < "usurper").
    deploy_copy(&dir, "incumbent", "heir");
    remove_plugin(&dir, "incumbent");
    serves_and_is_active(&registry, "heir").await;
    let held_by_heir = names("heir");
    eventually("usurper's rejection names the heir", || {
        registry
            .status("usurper")
            .is_some_and(|s| held_by_heir(&s.state))
    })
    .await;
    assert_eq!(rejections("usurper"), 2, "a new holder is a new rejection");
    watch.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A manifest that does not parse keeps its plugin's newest files rejected, even once the
/// component is put back to the serving build: it is not taken for "no manifest".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_manifest_left_behind_after_a_rollback_stays_rejected() {
    let dir = scripted_copies(&[("bare", manifest(&[HANDLER], 2))]);
    std::fs::remove_file(dir.join("bare.toml")).unwrap();
    let component = dir.join("bare.wasm");
    let original = std::fs::read(&component).unwrap();
    let registry = registry_on(&dir).await;
    assert_eq!(registry.status("bare").unwrap().state, "active");

    replace_file(&component, &component_variant(&original, 1));
    replace_file(&dir.join("bare.toml"), b"[plugin\nhandlers = ");
    registry.reload("bare").await;
    let state = registry.status("bare").unwrap().state;
    assert!(
        state.starts_with("rejected: ") && state.contains("bare.toml"),
        "{state}"
    );

    replace_file(&component, &original);
    registry.reload("bare").await;
    let state = registry.status("bare").unwrap().state;
    assert!(
        state.starts_with("rejected: ") && state.contains("bare.toml"),
        "{state}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A manifest written in two steps (a slow copy, an editor) is read half-written: the old
/// build keeps serving and the plugin reads as rejected. When the last write lands, the
/// directory watch reads it again and the new manifest serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_caught_mid_write_is_read_again_when_its_last_write_lands() {
    use std::io::Write as _;

    let dir = scripted_copies(&[("slow", manifest(&[HANDLER], 2))]);
    let registry = registry_on(&dir).await;
    let shutdown = CancellationToken::new();
    let watching = tokio::spawn(registry.clone().watch(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await; // the watch is set up

    let full = manifest(&[HANDLER], 3);
    // Cut inside a key, so the first half does not parse.
    let cut = full.find("max_instances").unwrap() + 7;
    let mut file = std::fs::File::create(dir.join("slow.toml")).unwrap();
    file.write_all(&full.as_bytes()[..cut]).unwrap();
    file.sync_data().unwrap();
    eventually("the half-written manifest is rejected", || {
        registry
            .status("slow")
            .is_some_and(|s| s.state.starts_with("rejected: ") && s.state.contains("slow.toml"))
    })
    .await;
    assert_eq!(
        registry.get(HANDLER).unwrap().slots.available_permits(),
        2,
        "the old manifest still serves"
    );

    file.write_all(&full.as_bytes()[cut..]).unwrap();
    drop(file);
    eventually("the whole manifest serves", || {
        registry.status("slow").is_some_and(|s| s.state == "active")
            && registry
                .get(HANDLER)
                .is_some_and(|p| p.slots.available_permits() == 3)
    })
    .await;
    shutdown.cancel();
    let _ = watching.await;
    let _ = std::fs::remove_dir_all(&dir);
}
