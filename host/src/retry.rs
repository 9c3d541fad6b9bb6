//! Retry delays shared by the worker (failed attempts) and the job manager (re-queued orphans).

use std::time::Duration;

/// Exponential backoff with jitter: `base * 2^attempt`, capped, then scaled by 50-100%.
pub fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    use rand::Rng;
    let exp = base.saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX));
    let capped = exp.min(cap);
    capped.mul_f64(rand::rng().random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        for attempt in 0..40 {
            let d = backoff(base, cap, attempt);
            assert!(d <= cap, "{d:?}");
            let full = base.saturating_mul(1 << attempt.min(16)).min(cap);
            assert!(d >= full / 2, "attempt {attempt}: {d:?}");
        }
    }
}
