//! `cargo xtask`: build helpers for the esi-host workspace.
//!
//! Plugins are Rust crates compiled for `wasm32-unknown-unknown` and then turned into
//! WebAssembly components. We deliberately do not target `wasm32-wasip2`: a plugin must not be
//! able to reach a clock, the file system or the network, and the simplest way to guarantee that
//! is for the host to link nothing but the `esi:worker` WIT package. A core module built for
//! `wasm32-unknown-unknown` carries the WIT metadata that `wit-bindgen` embeds, and
//! `wit-component` turns it into a component with exactly those imports and no WASI adapter.
//!
//! After encoding, every component is checked: its imports must all be instances of
//! `esi:worker/*@0.1.x` and it must export `describe` and `handle`. A dependency that quietly
//! pulls in WASI (or any other import) fails the build here, naming the import, instead of failing
//! at load time in the host.
//!
//! Release builds run Binaryen's `wasm-opt -O3` on each core module before it becomes a
//! component ([`WASM_OPT_ARGS`]). Binaryen optimises the WebAssembly that LLVM emitted, which
//! made the bundled plugins' components ~16% smaller and their jobs faster (BENCHMARKS.md, item
//! 21). It keeps the name section, so traps still name functions. `scripts/setup` installs it
//! (Debian's `binaryen`), so `scripts/build`, `scripts/test` and `scripts/demo` always optimise;
//! run directly without `wasm-opt` on the `PATH`, the build warns and goes on unoptimised.
//! `--no-wasm-opt` skips it; a `$WASM_OPT` that does not run fails the build.
//!
//! Finished components are written through a temporary file and a rename, because the host
//! hot-reloads its plugin directory and must never see a half-written `.wasm`.
//!
//! Test guests ([`TEST_GUESTS`], e.g. `tests/guests/scripted`) are built, componentized and
//! checked exactly like plugins, by the same command, but written to `<target dir>/test-plugins`:
//! the demo and production load `<target dir>/plugins` (or `--out`), and a guest that fails or
//! traps on cue has no place there. Integration tests find them through `ESI_TEST_PLUGIN_DIR`
//! (set by `scripts/test`).
//!
//! # Commands
//!
//! ```text
//! cargo xtask build-plugins [--debug] [--no-wasm-opt] [--out DIR] [--package NAME]...
//! cargo xtask componentize IN.wasm OUT.wasm     (not in --help; for hand-built guest modules)
//! ```

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, ensure, Context, Result};
use wasmparser::{ComponentExternalKind, ComponentTypeRef, Encoding, Parser, Payload, TypeBounds};
use wit_component::ComponentEncoder;

/// Cargo packages that `build-plugins` compiles, componentizes and checks, in build order,
/// into the plugin directory (`<target dir>/plugins` or `--out`).
///
/// Adding a plugin crate is one line here (the crate must be a workspace member with
/// `crate-type = ["cdylib", ...]`).
const PLUGINS: &[&str] = &["monitoring_worker", "vlan_pool_worker"];

/// Example plugins (`plugins/examples/*`): built like [`PLUGINS`] into `<target dir>/`
/// [`EXAMPLE_PLUGIN_DIR`], so the demo and production directories never serve them by accident.
const EXAMPLES: &[&str] = &["example_echo_worker"];

/// Directory under the target dir that receives [`EXAMPLES`].
const EXAMPLE_PLUGIN_DIR: &str = "example-plugins";

/// Guest crates only integration tests load, built like [`PLUGINS`] but into
/// `<target dir>/`[`TEST_PLUGIN_DIR`], never into the plugin directory.
const TEST_GUESTS: &[&str] = &["scripted_worker", "broken_describe_worker"];

/// Directory under the target dir that receives [`TEST_GUESTS`].
const TEST_PLUGIN_DIR: &str = "test-plugins";

/// The only target plugins are built for: no WASI, so nothing to import beyond our WIT package.
const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// The WIT package plugin imports must come from (`wit/worker.wit`).
const WIT_PACKAGE: &str = "esi:worker";

/// Versions of [`WIT_PACKAGE`] a plugin may import. For a 0.x package the minor version is the
/// compatibility boundary, so any 0.1 patch release is accepted. Keep in step with the `package`
/// line of `wit/worker.wit` (a unit test checks this).
const WIT_VERSION_PREFIX: &str = "0.1.";

/// Binaryen's optimiser: the program, unless `$WASM_OPT` names another.
const WASM_OPT: &str = "wasm-opt";
/// How release modules are optimised: `-O3` for speed (`-O4` and a second `-O3` measured the
/// same), `-g` to keep function names for trap backtraces. Binaryen reads the module's
/// `target_features` section, so it uses only the features rustc enabled.
const WASM_OPT_ARGS: &[&str] = &["-O3", "-g"];
/// Functions every plugin must export (the `handler` world).
const REQUIRED_EXPORTS: &[&str] = &["describe", "handle"];

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  build-plugins [--debug] [--no-wasm-opt] [--out DIR] [--package NAME]...
      Build plugin crates for wasm32-unknown-unknown, optimise them with wasm-opt (release
      builds), turn them into components, check their imports and exports, and write
      <out>/<crate>.wasm. Test guests (tests/guests/*) are built the same way into
      <target dir>/test-plugins, never into <out>.
        --debug          build with the dev profile instead of the `plugin` profile
        --no-wasm-opt    leave the release modules as rustc made them
        --out DIR        plugin output directory (default: <target dir>/plugins)
        --package NAME   build only this plugin or test guest (repeatable; alias -p)
  help
      Print this message.";

fn main() {
    if let Err(error) = run(std::env::args_os().skip(1).collect()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(args: Vec<OsString>) -> Result<()> {
    match parse_args(args)? {
        Task::BuildPlugins(options) => build_plugins(&options),
        Task::Componentize { input, output } => {
            let size = componentize_file(&input, &output)?;
            print_written("component", size, &output);
            Ok(())
        }
        Task::Help => {
            println!("{USAGE}");
            Ok(())
        }
    }
}

#[derive(Debug, PartialEq)]
enum Task {
    BuildPlugins(BuildOptions),
    Componentize { input: PathBuf, output: PathBuf },
    Help,
}

#[derive(Debug, PartialEq)]
struct BuildOptions {
    /// `true` builds with the dev profile.
    debug: bool,
    /// Run `wasm-opt` on release modules (`--no-wasm-opt` turns it off).
    wasm_opt: bool,
    out: Option<PathBuf>,
    /// Empty means every crate in [`PLUGINS`] and [`TEST_GUESTS`].
    packages: Vec<String>,
}

fn parse_args(args: Vec<OsString>) -> Result<Task> {
    let mut args = args.into_iter().map(|arg| {
        arg.into_string()
            .map_err(|arg| anyhow!("argument {arg:?} is not valid UTF-8"))
    });
    let command = match args.next().transpose()? {
        None => return Ok(Task::Help),
        Some(command) => command,
    };
    match command.as_str() {
        "build-plugins" => {
            let args: Vec<String> = args.collect::<Result<_>>()?;
            if args.iter().any(|arg| arg == "--help" || arg == "-h") {
                return Ok(Task::Help);
            }
            parse_build_options(args.into_iter()).map(Task::BuildPlugins)
        }
        "componentize" => {
            let usage = "usage: cargo xtask componentize IN.wasm OUT.wasm";
            let input = args.next().transpose()?.context(usage)?;
            let output = args.next().transpose()?.context(usage)?;
            ensure!(args.next().is_none(), "{usage}");
            Ok(Task::Componentize {
                input: input.into(),
                output: output.into(),
            })
        }
        "help" | "--help" | "-h" => Ok(Task::Help),
        other => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

fn parse_build_options(mut args: impl Iterator<Item = String>) -> Result<BuildOptions> {
    let mut options = BuildOptions {
        debug: false,
        wasm_opt: true,
        out: None,
        packages: Vec::new(),
    };
    while let Some(arg) = args.next() {
        let (flag, inline_value) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value)),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline_value {
                Some(value) => Ok(value.to_string()),
                None => args.next().with_context(|| format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "--debug" => options.debug = true,
            "--release" => options.debug = false,
            "--no-wasm-opt" => options.wasm_opt = false,
            "--out" => options.out = Some(value("--out")?.into()),
            "--package" | "-p" => {
                let name = value("--package")?;
                ensure!(
                    PLUGINS.contains(&name.as_str())
                        || EXAMPLES.contains(&name.as_str())
                        || TEST_GUESTS.contains(&name.as_str()),
                    "`{name}` is not a plugin crate; known plugins: {}; known test guests: {} \
                     (add new ones to PLUGINS, EXAMPLES or TEST_GUESTS in xtask/src/main.rs)",
                    [PLUGINS, EXAMPLES].concat().join(", "),
                    TEST_GUESTS.join(", ")
                );
                if !options.packages.contains(&name) {
                    options.packages.push(name);
                }
            }
            other => bail!("unknown option `{other}` for build-plugins\n\n{USAGE}"),
        }
    }
    Ok(options)
}

fn build_plugins(options: &BuildOptions) -> Result<()> {
    let root = workspace_root()?;
    let target_dir = target_dir(&root)?;
    let out_dir = match &options.out {
        Some(out) => std::path::absolute(out)
            .with_context(|| format!("resolving output directory {}", out.display()))?,
        None => target_dir.join("plugins"),
    };
    let test_out_dir = target_dir.join(TEST_PLUGIN_DIR);
    let example_out_dir = target_dir.join(EXAMPLE_PLUGIN_DIR);
    let packages: Vec<&str> = if options.packages.is_empty() {
        PLUGINS
            .iter()
            .chain(EXAMPLES)
            .chain(TEST_GUESTS)
            .copied()
            .collect()
    } else {
        options.packages.iter().map(String::as_str).collect()
    };

    cargo_build_wasm(&root, &target_dir, &packages, options.debug)?;

    let profile_dir = if options.debug {
        "debug"
    } else {
        PLUGIN_PROFILE
    };
    let artifact_dir = target_dir.join(WASM_TARGET).join(profile_dir);
    let wasm_opt = if options.debug || !options.wasm_opt {
        None
    } else {
        find_wasm_opt()?
    };
    for package in packages {
        let (dir, what) = if TEST_GUESTS.contains(&package) {
            (&test_out_dir, "test guest crate")
        } else if EXAMPLES.contains(&package) {
            (&example_out_dir, "example plugin crate")
        } else {
            (&out_dir, "plugin crate")
        };
        fs::create_dir_all(dir)
            .with_context(|| format!("creating output directory {}", dir.display()))?;
        // Cargo names the cdylib after the crate's library name, which swaps `-` for `_`.
        let file_name = format!("{}.wasm", package.replace('-', "_"));
        let mut module = artifact_dir.join(&file_name);
        if let Some(wasm_opt) = &wasm_opt {
            module = optimise(wasm_opt, &module).with_context(|| format!("{what} `{package}`"))?;
        }
        let output = dir.join(&file_name);
        let size =
            componentize_file(&module, &output).with_context(|| format!("{what} `{package}`"))?;
        print_written(package, size, &output);
        copy_manifest(&root, package, &output)?;
    }
    Ok(())
}

/// The `wasm-opt` to run, saying which. `None`, with a warning, when there is none on the
/// `PATH`; an error when `$WASM_OPT` names one that does not run.
fn find_wasm_opt() -> Result<Option<PathBuf>> {
    let named = std::env::var_os("WASM_OPT");
    let program = PathBuf::from(named.clone().unwrap_or_else(|| WASM_OPT.into()));
    let answer = Command::new(&program).arg("--version").output();
    match answer {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout);
            eprintln!(
                "optimising with {} {} ({})",
                program.display(),
                WASM_OPT_ARGS.join(" "),
                version.trim()
            );
            Ok(Some(program))
        }
        _ if named.is_some() => {
            let why = match answer {
                Ok(out) => format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
                Err(error) => error.to_string(),
            };
            bail!(
                "WASM_OPT={} does not run ({})",
                program.display(),
                why.trim()
            )
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "warning: {WASM_OPT} is not on the PATH (Debian: apt-get install binaryen): \
                 building unoptimised components, larger and slower"
            );
            Ok(None)
        }
        Ok(out) => bail!("{WASM_OPT} --version failed ({})", out.status),
        Err(error) => bail!("cannot run {WASM_OPT}: {error}"),
    }
}

/// Runs `wasm-opt` on `module`; returns the optimised module, written beside it.
fn optimise(wasm_opt: &Path, module: &Path) -> Result<PathBuf> {
    let optimised = module.with_extension("opt.wasm");
    let status = Command::new(wasm_opt)
        .args(WASM_OPT_ARGS)
        .arg(module)
        .arg("-o")
        .arg(&optimised)
        .status()
        .with_context(|| format!("running {}", wasm_opt.display()))?;
    ensure!(
        status.success(),
        "{} {} {} failed ({status})",
        wasm_opt.display(),
        WASM_OPT_ARGS.join(" "),
        module.display()
    );
    Ok(optimised)
}

/// The directory of a plugin or test guest crate, where its manifest lives.
fn crate_dir(package: &str) -> Option<&'static str> {
    match package {
        "monitoring_worker" => Some("plugins/monitoring"),
        "vlan_pool_worker" => Some("plugins/vlan_pool"),
        "scripted_worker" => Some("tests/guests/scripted"),
        "broken_describe_worker" => Some("tests/guests/broken_describe"),
        "example_echo_worker" => Some("plugins/examples/echo"),
        _ => None,
    }
}

/// Copies `<crate dir>/<name>.toml` (the plugin's manifest) next to its component, if the
/// crate has one; without it the host grants the plugin nothing.
fn copy_manifest(root: &Path, package: &str, component: &Path) -> Result<()> {
    let Some(dir) = crate_dir(package) else {
        return Ok(());
    };
    let name = component.with_extension("toml");
    let Some(file_name) = name.file_name() else {
        return Ok(());
    };
    let source = root.join(dir).join(file_name);
    if !source.exists() {
        return Ok(());
    }
    let text = fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
    write_atomically(&name, &text)?;
    print_written("  manifest", text.len(), &name);
    Ok(())
}

fn print_written(what: &str, size: usize, path: &Path) {
    println!(
        "{what:<24} {:>9.1} KiB  {}",
        size as f64 / 1024.0,
        path.display()
    );
}

/// The cargo profile of plugin builds (the workspace's Cargo.toml): release, plus whole-program
/// optimisation, which makes components smaller (faster to compile on a hot reload) and faster.
const PLUGIN_PROFILE: &str = "plugin";

/// Runs one `cargo build` for all `packages`, so shared dependencies are compiled once.
fn cargo_build_wasm(root: &Path, target_dir: &Path, packages: &[&str], debug: bool) -> Result<()> {
    // `cargo xtask` sets CARGO to the cargo that started us; use the same one (and toolchain).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(root)
        .arg("build")
        .args(["--target", WASM_TARGET])
        .arg("--target-dir")
        .arg(target_dir);
    if !debug {
        command.args(["--profile", PLUGIN_PROFILE]);
    }
    for package in packages {
        command.args(["-p", package]);
    }
    let status = command
        .status()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    ensure!(
        status.success(),
        "cargo build --target {WASM_TARGET} of {} failed ({status}); \
         is the target installed? (scripts/setup adds it)",
        packages.join(", ")
    );
    Ok(())
}

/// The workspace root is the parent of this crate's directory.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", manifest_dir.display()))
}

/// `CARGO_TARGET_DIR` (relative to the current directory, as cargo reads it) or `<root>/target`.
fn target_dir(root: &Path) -> Result<PathBuf> {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => std::path::absolute(&dir)
            .with_context(|| format!("resolving CARGO_TARGET_DIR={}", dir.to_string_lossy())),
        None => Ok(root.join("target")),
    }
}

/// Reads a core module, turns it into a checked component and writes it atomically to `output`.
/// Returns the component's size in bytes.
fn componentize_file(input: &Path, output: &Path) -> Result<usize> {
    let module = fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let component =
        componentize(&module).with_context(|| format!("componentizing {}", input.display()))?;
    check_component(&component)
        .with_context(|| format!("checking the component made from {}", input.display()))?;
    write_atomically(output, &component)?;
    Ok(component.len())
}

/// Turns a core module with `wit-bindgen` metadata into a component.
fn componentize(module: &[u8]) -> Result<Vec<u8>> {
    ComponentEncoder::default()
        .module(module)
        .context("reading the WIT metadata embedded by wit-bindgen (is this a plugin crate?)")?
        .validate(true)
        .encode()
        .context("encoding the component")
}

/// Checks that `component` imports only `esi:worker` instances and exports the handler world.
fn check_component(component: &[u8]) -> Result<()> {
    let mut exports = Vec::new();
    // Nested modules and components are reported inline by `parse_all`; only the outermost
    // component's imports and exports are what the host has to link.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(component) {
        match payload.context("parsing the component")? {
            Payload::Version { encoding, .. } => {
                ensure!(
                    depth > 0 || encoding == Encoding::Component,
                    "not a component but a core module"
                );
                depth += 1;
            }
            Payload::End(_) => depth -= 1,
            Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    let import = import.context("reading the component's imports")?;
                    let name = import.name.full_name();
                    check_import(&name, &import.ty)?;
                }
            }
            Payload::ComponentExportSection(reader) if depth == 1 => {
                for export in reader {
                    let export = export.context("reading the component's exports")?;
                    if export.kind == ComponentExternalKind::Func {
                        exports.push(export.name.full_name().into_owned());
                    }
                }
            }
            _ => {}
        }
    }
    for required in REQUIRED_EXPORTS {
        ensure!(
            exports.iter().any(|export| export == required),
            "the component does not export function `{required}` (exports: [{}]); \
             plugins must implement the `handler` world of wit/worker.wit",
            exports.join(", ")
        );
    }
    Ok(())
}

fn check_import(name: &str, ty: &ComponentTypeRef) -> Result<()> {
    let allowed = format!("{WIT_PACKAGE}/*@{WIT_VERSION_PREFIX}x");
    match ty {
        ComponentTypeRef::Instance(_) => ensure!(
            is_allowed_interface(name),
            "the component imports `{name}`, but plugins may import only {allowed} interfaces: \
             the host links no WASI. Look for a dependency that uses std::fs, std::env, \
             std::time or random numbers, or a wit-bindgen built against another WIT package \
             version."
        ),
        // A world-level `use types.{job, ...}` becomes a type import bound to a type of an
        // imported interface. It names a type the host already provides and links nothing.
        ComponentTypeRef::Type(TypeBounds::Eq(_)) => {}
        _ => bail!(
            "the component imports `{name}`, which is not an interface; plugins may import only \
             {allowed} interfaces"
        ),
    }
    Ok(())
}

/// `esi:worker/<interface>@0.1.<patch>`.
fn is_allowed_interface(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(WIT_PACKAGE)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return false;
    };
    let Some((interface, version)) = rest.split_once('@') else {
        return false;
    };
    let Some(patch) = version.strip_prefix(WIT_VERSION_PREFIX) else {
        return false;
    };
    !interface.is_empty() && !patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit())
}

/// Writes `bytes` to `path` via a temporary file in the same directory and a rename, so a reader
/// (the host's hot reload) sees either the old file or the complete new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let file_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    // A dot file without the `.wasm` extension, so a directory watcher ignores it.
    let temp = dir.join(format!(
        ".{}.tmp{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut file =
            fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", temp.display()))?;
        fs::rename(&temp, path)
            .with_context(|| format!("renaming {} to {}", temp.display(), path.display()))
    })();
    if result.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn allowed_interfaces_are_esi_worker_0_1_instances() {
        assert!(is_allowed_interface("esi:worker/host@0.1.0"));
        assert!(is_allowed_interface("esi:worker/types@0.1.17"));
        assert!(!is_allowed_interface("esi:worker/host@0.2.0"));
        assert!(!is_allowed_interface("esi:worker/host@0.1.0-rc1"));
        assert!(!is_allowed_interface("esi:worker/host"));
        assert!(!is_allowed_interface("esi:workers/host@0.1.0"));
        assert!(!is_allowed_interface("wasi:cli/environment@0.2.0"));
        assert!(!is_allowed_interface("log"));
    }

    #[test]
    fn a_non_instance_import_is_rejected_by_name() {
        let error = check_import("log", &ComponentTypeRef::Func(0)).unwrap_err();
        assert!(error.to_string().contains("`log`"), "{error}");
        let error =
            check_import("clock", &ComponentTypeRef::Type(TypeBounds::SubResource)).unwrap_err();
        assert!(error.to_string().contains("`clock`"), "{error}");
    }

    #[test]
    fn world_level_type_imports_are_allowed() {
        check_import("job", &ComponentTypeRef::Type(TypeBounds::Eq(3))).unwrap();
    }

    #[test]
    fn a_wasi_import_is_rejected_by_name() {
        let error = check_import(
            "wasi:clocks/wall-clock@0.2.0",
            &ComponentTypeRef::Instance(0),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("`wasi:clocks/wall-clock@0.2.0`"),
            "{error}"
        );
    }

    #[test]
    fn version_prefix_matches_the_wit_package() {
        let wit_path = workspace_root().unwrap().join("wit/worker.wit");
        let wit = fs::read_to_string(&wit_path).unwrap();
        let package_line = format!("package {WIT_PACKAGE}@{WIT_VERSION_PREFIX}");
        assert!(
            wit.lines().any(|line| line.starts_with(&package_line)),
            "{} does not declare `{package_line}*`; update WIT_VERSION_PREFIX",
            wit_path.display()
        );
    }

    #[test]
    fn build_plugins_takes_debug_out_and_repeated_packages() {
        let task = parse_args(args(&[
            "build-plugins",
            "--debug",
            "--out=dist",
            "-p",
            "monitoring_worker",
            "--package",
            "monitoring_worker",
        ]))
        .unwrap();
        assert_eq!(
            task,
            Task::BuildPlugins(BuildOptions {
                debug: true,
                wasm_opt: true,
                out: Some("dist".into()),
                packages: vec!["monitoring_worker".into()],
            })
        );
    }

    #[test]
    fn build_plugins_help_is_help() {
        assert_eq!(
            parse_args(args(&["build-plugins", "--help"])).unwrap(),
            Task::Help
        );
    }

    #[test]
    fn unknown_package_names_the_known_plugins() {
        let error = parse_args(args(&["build-plugins", "--package", "nope"])).unwrap_err();
        assert!(error.to_string().contains("monitoring_worker"), "{error}");
        assert!(error.to_string().contains("scripted_worker"), "{error}");
    }

    #[test]
    fn test_guests_can_be_built_alone() {
        assert_eq!(
            parse_args(args(&["build-plugins", "-p", "scripted_worker"])).unwrap(),
            Task::BuildPlugins(BuildOptions {
                debug: false,
                wasm_opt: true,
                out: None,
                packages: vec!["scripted_worker".into()],
            })
        );
    }

    #[test]
    fn wasm_opt_can_be_turned_off() {
        let Task::BuildPlugins(options) =
            parse_args(args(&["build-plugins", "--no-wasm-opt"])).unwrap()
        else {
            panic!("not a build");
        };
        assert!(!options.wasm_opt && !options.debug);
    }

    #[test]
    fn no_crate_is_both_a_plugin_and_a_test_guest() {
        for guest in TEST_GUESTS {
            assert!(!PLUGINS.contains(guest), "{guest} is in both lists");
            assert!(!EXAMPLES.contains(guest), "{guest} is in both lists");
        }
    }

    #[test]
    fn componentize_needs_two_paths() {
        assert!(parse_args(args(&["componentize", "in.wasm"])).is_err());
        assert_eq!(
            parse_args(args(&["componentize", "in.wasm", "out.wasm"])).unwrap(),
            Task::Componentize {
                input: "in.wasm".into(),
                output: "out.wasm".into()
            }
        );
    }

    #[test]
    fn core_modules_are_not_components() {
        // The smallest valid core module: magic and version 1.
        let module = b"\0asm\x01\0\0\0";
        let error = check_component(module).unwrap_err();
        assert!(error.to_string().contains("core module"), "{error}");
    }

    #[test]
    fn atomic_write_leaves_only_the_final_file() {
        let dir = std::env::temp_dir().join(format!("xtask-atomic-{}", std::process::id()));
        let path = dir.join("plugin.wasm");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("plugin.wasm")]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
