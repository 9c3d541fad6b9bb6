//! `/metrics`, `/healthz` and `/readyz` (issue 7). Metrics are process-wide, so this file runs
//! one host at a time and each test its own counts: the tests run one after another. Also: a
//! completion whose answer is lost in transit is still counted, once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use esi_host::keys::Record;
use esi_host::local_etcd::LocalEtcd;
use esi_host::metrics;
use esi_host::store::counters::StoreCounters;
use esi_tests::proxy::AnswerLosingProxy;
use esi_tests::scripted::{completed_output, put_scripted_job, RESOURCE_TYPE, TIMEOUT};
use esi_tests::{plugin_dir_with_test_guests, TestEnv};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

/// One test at a time: both read the process-wide metrics.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// `GET path` over plain HTTP/1.0; returns the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The value of the sample `name{labels}` in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_50_job_flow() {
    let _one_at_a_time = SERIAL.lock().await;
    let env = TestEnv::new().await.unwrap();
    let mut config = env.host_config();
    config.plugin_dir = plugin_dir_with_test_guests();
    config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let host = esi_host::Host::start(config).await.unwrap();
    let addr = host.metrics_addr().unwrap();
    let txns_before = StoreCounters::process_totals().snapshot().txn;
    let before = get(addr, "/metrics").await.1;
    let count = |page: &str, series: &str| sample(page, series).unwrap_or(0.0);

    let mut resources = Vec::new();
    for _ in 0..50 {
        resources.push(put_scripted_job(&env, None).await);
    }
    for resource in &resources {
        assert_eq!(
            completed_output(&env, resource).await,
            json!({"attempts": 0})
        );
    }
    env.wait_jobs_drained().await.unwrap();

    let (status, page) = get(addr, "/metrics").await;
    let txns = (StoreCounters::process_totals().snapshot().txn - txns_before) as f64;
    assert_eq!(status, 200);
    let delta = |series: &str| count(&page, series) - count(&before, series);
    assert_eq!(
        delta("esi_jobs_claimed_total{handler=\"scripted_worker\"}"),
        50.0,
        "{page}"
    );
    assert_eq!(
        delta("esi_jobs_completed_total{handler=\"scripted_worker\",action=\"create\"}"),
        50.0,
        "{page}"
    );
    assert_eq!(
        delta("esi_job_duration_seconds_count{handler=\"scripted_worker\"}"),
        50.0,
        "{page}"
    );
    assert_eq!(
        delta(
            "esi_plugin_call_duration_seconds_count{plugin=\"scripted_worker\",version=\"0.1.0\"}"
        ),
        50.0,
        "{page}"
    );
    assert_eq!(
        delta("esi_plugin_instantiate_duration_seconds_count{plugin=\"scripted_worker\",version=\"0.1.0\"}"),
        50.0,
        "{page}"
    );
    assert_eq!(
        delta("esi_jobs_failed_total{handler=\"scripted_worker\",action=\"create\"}"),
        0.0
    );
    // Every etcd transaction of the process is timed (claims and completions of jobs
    // running at once share transactions, so there are fewer than two per job). The tests of
    // this binary run one at a time; a write landing between the two readings is allowed.
    let timed = delta("esi_etcd_operation_duration_seconds_count{op=\"txn\"}");
    assert!(
        timed >= 2.0 && (timed - txns).abs() <= 2.0,
        "{timed} transactions timed, {txns} counted\n{page}"
    );
    assert_eq!(
        sample(&page, "esi_queue_depth{queue=\"ready\"}"),
        Some(0.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "esi_queue_depth{queue=\"working\"}"),
        Some(0.0),
        "{page}"
    );

    // A job for a handler no plugin serves stays in ready, and the gauge counts it.
    let (id, record) = esi_tests::job_record(
        "nobody_serves_this",
        "create",
        "ha_router",
        "unserved",
        1,
        true,
        true,
        &[],
        "fail",
        json!({"id": "unserved"}),
    );
    env.put_job(&id, &record, true).await.unwrap();
    let page = get(addr, "/metrics").await.1;
    assert_eq!(
        sample(&page, "esi_queue_depth{queue=\"ready\"}"),
        Some(1.0),
        "{page}"
    );
    assert!(page.contains("# TYPE esi_jobs_claimed counter"), "{page}");

    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_string()));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_while_etcd_is_down_and_ready_when_it_is_back() {
    let _one_at_a_time = SERIAL.lock().await;
    let etcd = LocalEtcd::start().await.unwrap();
    let mut config =
        esi_host::HostConfig::new(vec![etcd.endpoint().to_string()], esi_tests::plugin_dir());
    config.lease_ttl = Duration::from_secs(5);
    config.compile_cache = None;
    config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let host = esi_host::Host::start(config).await.unwrap();
    let addr = host.metrics_addr().unwrap();
    let wait_for = |want: u16| async move {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let (status, body) = get(addr, "/readyz").await;
            if status == want {
                return body;
            }
            assert!(Instant::now() < deadline, "/readyz still {status}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(wait_for(200).await, "ready\n");

    // Frozen etcd answers nothing: unready, saying why; the process itself stays healthy.
    let pid = etcd.pid().unwrap().to_string();
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    let body = wait_for(503).await;
    assert!(body.contains("etcd"), "{body}");
    assert_eq!(get(addr, "/healthz").await.0, 200);

    signal("-CONT");
    wait_for(200).await;
    host.shutdown().await;
    etcd.stop().await;
}

/// A worker-only host reaching etcd through a proxy that can lose one answer, with a lease
/// long enough that no keep-alive falls in a test's window.
async fn host_behind_answer_losing_proxy(env: &TestEnv) -> (esi_host::Host, AnswerLosingProxy) {
    let proxy = AnswerLosingProxy::start(&env.endpoint).await.unwrap();
    let mut config = env.worker_only_config();
    config.etcd_endpoints = vec![proxy.endpoint()];
    config.plugin_dir = plugin_dir_with_test_guests();
    config.lease_ttl = Duration::from_secs(60);
    config.compile_cache = None;
    (esi_host::Host::start(config).await.unwrap(), proxy)
}

/// Runs scripted jobs until the answer lost is the one to the request the job's script
/// leads to once claimed: `landed` (asked while the host cannot reach etcd) says whether that
/// request committed. Each job must complete. Returns the `counter` values before and after
/// the job whose lost request committed. The cut loses the answer to the next request the
/// host sends; an HTTP/2 keep-alive ping may go first, hence the tries.
async fn lose_the_answer_of(
    env: &TestEnv,
    proxy: &AnswerLosingProxy,
    script: serde_json::Value,
    landed: impl AsyncFn(&str) -> bool,
    counter: impl Fn() -> u64,
) -> (u64, u64) {
    for _ in 0..5 {
        let before = counter();
        let mut changes = env.record_changes().await.unwrap();
        let resource = put_scripted_job(env, Some(script.clone())).await;
        changes.until_claimed(env.keys(), TIMEOUT).await.unwrap();
        if landed(&resource).await {
            // The aimed request went before the proxy was armed: this try proves nothing.
            completed_output(env, &resource).await;
            continue;
        }
        proxy.arm();
        proxy.wait_cut(TIMEOUT).await;
        let committed = landed(&resource).await;
        completed_output(env, &resource).await;
        if !committed {
            continue;
        }
        // The retry finds the claim gone while the host's lease lives: the host's own
        // request ended it. Counted once, however long we look.
        let deadline = Instant::now() + TIMEOUT;
        while counter() == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        return (before, counter());
    }
    panic!("in 5 tries, the lost answer was never the one aimed at");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_answer_was_lost_is_counted_once() {
    let _one_at_a_time = SERIAL.lock().await;
    let env = TestEnv::new().await.unwrap();
    let (host, proxy) = host_behind_answer_losing_proxy(&env).await;
    // The plugin asks to run again in a second: the completion is the next request.
    let state_written = async |resource: &str| {
        let state_key = env.key(Record::State, RESOURCE_TYPE, resource);
        env.get_json(&state_key).await.unwrap().is_some()
    };
    let completed = || {
        let labels = metrics::labels([("handler", "scripted_worker"), ("action", "create")]);
        metrics::global()
            .jobs_completed
            .get_or_create(&labels)
            .get()
    };
    let (before, after) = lose_the_answer_of(
        &env,
        &proxy,
        json!({"wait_once_ms": 1000}),
        state_written,
        completed,
    )
    .await;
    assert_eq!(after, before + 1, "the completion is counted, once");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_requeue_answer_was_lost_is_counted_once() {
    let _one_at_a_time = SERIAL.lock().await;
    let env = TestEnv::new().await.unwrap();
    let (host, proxy) = host_behind_answer_losing_proxy(&env).await;
    // The first attempt fails retryably; after the retry backoff (500 ms by default) the
    // re-queue is the next request.
    let requeued = async |_: &str| {
        let ready = env.keys().queue_prefix(esi_host::keys::Queue::Ready);
        env.store.count(&ready).await.unwrap() == 1
    };
    let retried = || {
        let labels = metrics::labels([("handler", "scripted_worker")]);
        metrics::global().jobs_retried.get_or_create(&labels).get()
    };
    let (before, after) = lose_the_answer_of(
        &env,
        &proxy,
        json!({"fail_retryable_until_attempt": 1}),
        requeued,
        retried,
    )
    .await;
    assert_eq!(after, before + 1, "the retry is counted, once");
    host.shutdown().await;
}
