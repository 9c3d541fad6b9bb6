//! Chaos: real `esi-host` processes killed with SIGKILL or frozen with SIGSTOP while they work.
//! The promise under test: every job runs to completion exactly once in effect, and a stale
//! host's write is refused by the fencing compare.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use esi_host::keys::Record;
use esi_host::seed;
use esi_tests::{host_binary, plugin_dir, seed_ha_interface_body, TestEnv};

/// One `esi-host run` process with its log in a file.
struct HostProcess {
    child: Child,
    log: PathBuf,
}

impl HostProcess {
    fn spawn(env: &TestEnv, name: &str, extra: &[&str]) -> HostProcess {
        let log = std::env::temp_dir().join(format!("esi-chaos-{}-{name}.log", uuid_suffix()));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(host_binary())
            .args([
                "run",
                "--etcd",
                &env.endpoint,
                "--key-root",
                env.keys().root(),
                "--host-id",
                name,
            ])
            .arg("--plugins")
            .arg(plugin_dir())
            .args(["--lease-ttl", "2", "--drain-timeout", "1"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("esi-host starts");
        HostProcess { child, log }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn uuid_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_killed_in_turn_complete_every_job_exactly_once() {
    let env = TestEnv::new().await.unwrap();
    // Jobs wait (holding their claims) for the secondary interface, which only appears after
    // the third kill: every host dies with claims in hand at least once.
    env.put_ha_interface_template_retrying_every("0.5")
        .await
        .unwrap();
    env.put_interface_states(Some("ACTIVE"), None)
        .await
        .unwrap();
    let names = ["chaos-a", "chaos-b", "chaos-c"];
    let mut hosts: Vec<HostProcess> = names
        .iter()
        .map(|n| HostProcess::spawn(&env, n, &[]))
        .collect();

    let ids: Vec<String> = (0..300)
        .map(|i| format!("c4a05000-0000-4000-8000-{i:012}"))
        .collect();
    for id in &ids {
        env.put_config("ha_interface", id, &seed_ha_interface_body(id), 1)
            .await
            .unwrap();
    }
    // Kill one host every 2 s (round robin) and restart it, until every resource has a state.
    let state_prefix = env.keys().record_family(Record::State);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut turn = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (states, _) = env.store.list(&state_prefix).await.unwrap();
        let done = states
            .iter()
            .filter(|kv| kv.key.contains("/ha_interfaces/"))
            .count();
        if done >= ids.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of 300 resources finished"
        );
        let i = turn % hosts.len();
        hosts[i] = HostProcess::spawn(&env, names[i], &[]); // drops (SIGKILLs) the old one
        turn += 1;
        if turn == 3 {
            env.put_interface_states(None, Some("ACTIVE"))
                .await
                .unwrap();
        }
    }
    env.wait_jobs_drained().await.unwrap();

    let puts = env.state_put_counts().await.unwrap();
    for id in &ids {
        let state = env.wait_completed("ha_interface", id).await.unwrap();
        assert_eq!(state["state"]["worker_state"], "CREATE_COMPLETED");
        let key = env.key(Record::State, "ha_interface", id);
        assert_eq!(
            puts.get(&key),
            Some(&1),
            "{key} was published {:?} times",
            puts.get(&key)
        );
        let job_state = env.key(Record::JobState, "ha_interface", id);
        assert_eq!(
            env.get_json(&job_state).await.unwrap(),
            None,
            "{job_state} left behind"
        );
    }
    assert!(turn >= 3, "the test killed hosts {turn} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_frozen_past_its_lease_cannot_publish_the_job_it_lost() {
    let env = TestEnv::new().await.unwrap();
    env.put_ha_interface_template_retrying_every("0.2")
        .await
        .unwrap();
    env.put_interface_states(Some("ACTIVE"), None)
        .await
        .unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    // The job manager runs in this test process, with no plugin of its own.
    let manager = env.start_manager_only().await.unwrap();
    let frozen = HostProcess::spawn(&env, "frozen", &["--worker-only"]);

    let id = seed::HA_INTERFACE_ID;
    env.put_config("ha_interface", id, &seed_ha_interface_body(id), 1)
        .await
        .unwrap();
    recorder
        .until_claimed(env.keys(), Duration::from_secs(30))
        .await
        .unwrap();

    // Frozen past its 2 s lease: the claim vanishes, the job goes to another worker.
    frozen.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let other = esi_host::Host::start(env.worker_only_config())
        .await
        .unwrap();
    env.put_interface_states(None, Some("ACTIVE"))
        .await
        .unwrap();
    env.wait_completed("ha_interface", id).await.unwrap();

    // Resumed, the frozen host either finishes the job and tries to publish it, or first
    // notices its lease is gone, stops the job and tries to hand it back. Both are writes
    // fenced by its reservation, and etcd refuses both.
    frozen.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(15);
    let refused = |log: &str| {
        log.contains("lost the claim before completing")
            || log.contains("lost the claim before handing the job back (the fence refused it)")
    };
    while !refused(&frozen.log()) {
        assert!(
            Instant::now() < deadline,
            "the frozen host never tried to publish:\n{}",
            frozen.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = env.key(Record::State, "ha_interface", id);
    assert_eq!(
        env.state_put_counts().await.unwrap().get(&key),
        Some(&1),
        "only one worker published"
    );
    other.shutdown().await;
    manager.shutdown().await;
}
