//! A three-member etcd cluster on loopback: killing the etcd leader during a burst loses
//! nothing and publishes nothing twice.

use std::time::Duration;

use esi_host::keys::Record;
use esi_host::local_etcd::LocalEtcdCluster;
use esi_tests::{seed_ha_interface_body, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_during_a_burst_loses_nothing() {
    let mut cluster = LocalEtcdCluster::start(3).await.unwrap();
    let env = TestEnv::on_cluster(cluster.endpoints()).await.unwrap();
    env.load_seed_world().await.unwrap();
    let mut a = env.host_config();
    a.host_id = "cluster-a".into();
    let mut b = env.host_config();
    b.host_id = "cluster-b".into();
    let host_a = esi_host::Host::start(a).await.unwrap();
    let host_b = esi_host::Host::start(b).await.unwrap();

    let ids: Vec<String> = (0..300)
        .map(|i| format!("e7cd0000-0000-4000-8000-{i:012}"))
        .collect();
    for (n, id) in ids.iter().enumerate() {
        let body = seed_ha_interface_body(id);
        // The writer (gohan) retries too: a put may fail while the cluster elects a leader.
        while env.put_config("ha_interface", id, &body, 1).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if n == 100 {
            let leader = cluster.leader().await.expect("a leader");
            cluster.kill(leader).await;
        }
    }
    for id in &ids {
        let state = env.wait_completed("ha_interface", id).await.unwrap();
        assert_eq!(state["state"]["worker_state"], "CREATE_COMPLETED");
    }
    env.wait_jobs_drained().await.unwrap();

    // Exactly one /state PUT per resource, counted from revision 1.
    let puts = env.state_put_counts().await.unwrap();
    for id in &ids {
        let key = env.key(Record::State, "ha_interface", id);
        assert_eq!(puts.get(&key), Some(&1), "{key}");
    }
    host_a.shutdown().await;
    host_b.shutdown().await;
}
