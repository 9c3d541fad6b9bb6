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
    fn rss_and_cpu_time_are_readable_on_linux() {
        assert!(rss_bytes().unwrap() > 0);
        let busy = std::time::Instant::now();
        while busy.elapsed() < Duration::from_millis(30) {}
        assert!(cpu_time(None).unwrap() > Duration::ZERO);
    }
}
