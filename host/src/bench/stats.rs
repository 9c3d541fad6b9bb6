//! Measuring helpers: latency percentiles, bounded concurrency, the process's resident memory.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Percentiles of a set of durations, in milliseconds for the report.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    /// Nearest-rank percentiles of `samples` (all zero when there are none).
    pub fn of(mut samples: Vec<Duration>) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let total: Duration = samples.iter().sum();
        let count = samples.len();
        Summary {
            count,
            p50_ms: ms(percentile(&samples, 50.0)),
            p99_ms: ms(percentile(&samples, 99.0)),
            max_ms: ms(samples[count - 1]),
            mean_ms: ms(total) / count as f64,
        }
    }
}

/// The nearest-rank `p`th percentile of sorted, non-empty `samples`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `samples` (zero when empty).
pub fn median(mut samples: Vec<Duration>) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    percentile(&samples, 50.0)
}

/// The median of `values` by the same nearest rank as [`median`] (zero when empty).
pub fn median_of(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let rank = (sorted.len() as f64 / 2.0).ceil() as usize;
    sorted.get(rank.max(1) - 1).copied().unwrap_or(0.0)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs `task` on every item with at most `limit` running at once; the first error wins.
pub async fn for_each_concurrent<T, F, Fut>(
    items: Vec<T>,
    limit: usize,
    task: F,
) -> anyhow::Result<()>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let queue = Arc::new(Mutex::new(items.into_iter()));
    let task = Arc::new(task);
    let mut workers = JoinSet::new();
    for _ in 0..limit.max(1) {
        let (queue, task) = (queue.clone(), task.clone());
        workers.spawn(async move {
            loop {
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some(item) = next else {
                    return anyhow::Ok(());
                };
                task(item).await?;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("a benchmark task panicked")??;
    }
    Ok(())
}

/// The resident set size of this process (`VmRSS` of `/proc/self/status`), in bytes.
pub fn rss_bytes() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:")) else {
        bail!("/proc/self/status has no VmRSS line");
    };
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("/proc/self/status: cannot read {line:?}"))?;
    Ok(kib * 1024)
}

/// CPU time (user + system, all threads) process `pid` (`None`: this one) has used so far.
///
/// From `/proc/<pid>/stat` fields 14 and 15, in clock ticks of 10 ms (`USER_HZ` is 100 on
/// every Linux platform the host runs on).
pub fn cpu_time(pid: Option<u32>) -> anyhow::Result<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; the fields after it are plain numbers.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3, so fields 14 and 15 are at indices 11 and 12.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        let field = fields
            .get(i)
            .with_context(|| format!("{path}: field {} missing", i + 3))?;
        field
            .parse()
            .with_context(|| format!("{path}: field {} is {field:?}", i + 3))
    };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// Samples [`rss_bytes`] in the background and keeps the highest value.
pub struct RssSampler {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(every: Duration) -> RssSampler {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = rss_bytes().unwrap_or(0);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return peak.max(rss_bytes().unwrap_or(0)),
                    _ = tokio::time::sleep(every) => peak = peak.max(rss_bytes().unwrap_or(0)),
                }
            }
        });
        RssSampler { stop, task }
    }

    /// Stops sampling; the highest RSS seen, in bytes.
    pub async fn stop(self) -> u64 {
        self.stop.cancel();
        self.task.await.unwrap_or(0)
    }
}

/// Disk waits slower than this are counted apart: each one holds up every commit behind it.
pub const SLOW_DISK_SECONDS: &str = "0.032";

/// etcd's disk waits so far, from the histograms on its `/metrics` page: WAL syncs (one per
/// raft round) and backend commits (bbolt, about every 100 ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EtcdDisk {
    pub wal_syncs: u64,
    /// WAL syncs slower than [`SLOW_DISK_SECONDS`].
    pub slow_wal_syncs: u64,
    pub backend_commits: u64,
    /// Backend commits slower than [`SLOW_DISK_SECONDS`].
    pub slow_backend_commits: u64,
}

impl EtcdDisk {
    /// The waits between `earlier` and `self`.
    pub fn since(self, earlier: EtcdDisk) -> EtcdDisk {
        EtcdDisk {
            wal_syncs: self.wal_syncs.saturating_sub(earlier.wal_syncs),
            slow_wal_syncs: self.slow_wal_syncs.saturating_sub(earlier.slow_wal_syncs),
            backend_commits: self.backend_commits.saturating_sub(earlier.backend_commits),
            slow_backend_commits: self
                .slow_backend_commits
                .saturating_sub(earlier.slow_backend_commits),
        }
    }

    /// Slow WAL syncs and slow backend commits together.
    pub fn slow(self) -> u64 {
        self.slow_wal_syncs + self.slow_backend_commits
    }

    /// Reads the counts out of a Prometheus text page.
    fn parse(page: &str) -> anyhow::Result<EtcdDisk> {
        let value = |name: &str| -> anyhow::Result<u64> {
            let line = page
                .lines()
                .find(|line| line.split_whitespace().next() == Some(name))
                .with_context(|| format!("etcd's /metrics has no {name}"))?;
            let number = line.split_whitespace().nth(1).unwrap_or_default();
            number
                .parse::<f64>()
                .map(|n| n as u64)
                .with_context(|| format!("etcd's /metrics: {name} is {number:?}, not a number"))
        };
        // (all, slower than SLOW_DISK_SECONDS) of one histogram.
        let histogram = |metric: &str| -> anyhow::Result<(u64, u64)> {
            let all = value(&format!("{metric}_count"))?;
            let fast = value(&format!("{metric}_bucket{{le=\"{SLOW_DISK_SECONDS}\"}}"))?;
            Ok((all, all.saturating_sub(fast)))
        };
        let (wal_syncs, slow_wal_syncs) = histogram("etcd_disk_wal_fsync_duration_seconds")?;
        let (backend_commits, slow_backend_commits) =
            histogram("etcd_disk_backend_commit_duration_seconds")?;
        Ok(EtcdDisk {
            wal_syncs,
            slow_wal_syncs,
            backend_commits,
            slow_backend_commits,
        })
    }
}

/// Reads etcd's disk histograms from `<endpoint>/metrics` (etcd serves it on its client URL),
/// with a plain HTTP/1.0 request: the bench needs one page, not an HTTP client.
pub async fn etcd_disk(endpoint: &str) -> anyhow::Result<EtcdDisk> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("{endpoint}: not an http:// endpoint"))?
        .trim_end_matches('/');
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut page = String::new();
        stream.read_to_string(&mut page).await?;
        std::io::Result::Ok(page)
    };
    let page = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("{endpoint}/metrics: no answer in 5 s"))?
        .with_context(|| format!("reading {endpoint}/metrics"))?;
    EtcdDisk::parse(&page).with_context(|| format!("{endpoint}/metrics"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(samples);
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (50.0, 99.0, 100.0));
        assert_eq!(Summary::of(vec![]).count, 0);
    }

    #[test]
    fn the_median_of_ratios_takes_the_same_rank_as_that_of_durations() {
        let ratios = [3.4, 2.5, 4.4, 3.3];
        let durations: Vec<Duration> = ratios.iter().map(|r| Duration::from_secs_f64(*r)).collect();
        assert_eq!(median_of(&ratios), 3.3);
        assert_eq!(median(durations).as_secs_f64(), 3.3);
        assert_eq!(median_of(&[3.4, 2.5, 4.4]), 3.4);
        assert_eq!(median_of(&[]), 0.0);
    }

    #[test]
    fn rss_and_cpu_time_are_readable_on_linux() {
        assert!(rss_bytes().unwrap() > 0);
        let busy = std::time::Instant::now();
        while busy.elapsed() < Duration::from_millis(30) {}
        assert!(cpu_time(None).unwrap() > Duration::ZERO);
    }

    #[test]
    fn disk_waits_come_from_the_histograms() {
        let page = "# HELP etcd_disk_wal_fsync_duration_seconds ...\n\
            etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.016\"} 90\n\
            etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.032\"} 97\n\
            etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 100\n\
            etcd_disk_wal_fsync_duration_seconds_count 100\n\
            etcd_disk_backend_commit_duration_seconds_bucket{le=\"0.032\"} 9\n\
            etcd_disk_backend_commit_duration_seconds_count 10\n";
        let disk = EtcdDisk::parse(page).unwrap();
        let expected = EtcdDisk {
            wal_syncs: 100,
            slow_wal_syncs: 3,
            backend_commits: 10,
            slow_backend_commits: 1,
        };
        assert_eq!(disk, expected);
        assert_eq!(disk.slow(), 4);
        let earlier = EtcdDisk {
            wal_syncs: 40,
            slow_wal_syncs: 1,
            backend_commits: 4,
            slow_backend_commits: 0,
        };
        assert_eq!(disk.since(earlier).slow(), 3);
        assert_eq!(disk.since(earlier).wal_syncs, 60);
        let error = EtcdDisk::parse("up 1\n").unwrap_err().to_string();
        assert!(
            error.contains("etcd_disk_wal_fsync_duration_seconds_count"),
            "{error}"
        );
    }
}
