//! Waiting between attempts while a store is down.

use std::time::Duration;

/// Exponential backoff with jitter: `base` doubling per consecutive failure up to `cap`, each
/// wait a random 50-100% of that so replicas do not retry in step.
pub fn backoff(failures: u32, base: Duration, cap: Duration) -> Duration {
    let base_ms = base.as_millis().max(1) as u64;
    let ms = base_ms
        .saturating_mul(1 << failures.min(16))
        .min(cap.as_millis() as u64)
        .max(1);
    Duration::from_millis(ms / 2 + rand::random_range(0..=ms / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let (base, cap) = (Duration::from_millis(50), Duration::from_secs(2));
        for failures in 0..40 {
            let d = backoff(failures, base, cap);
            assert!(d <= cap, "{failures}: {d:?}");
            assert!(d >= base / 2, "{failures}: {d:?}");
        }
        assert!(backoff(10, base, cap) >= Duration::from_secs(1));
        assert!(backoff(0, base, cap) <= Duration::from_millis(50));
    }
}
