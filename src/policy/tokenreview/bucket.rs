//! A token bucket bounding how often the broker calls TokenReview.
//!
//! Why: every token the verdict cache has not seen costs an API server
//! call; a caller presenting a fresh random token per request would
//! otherwise turn the broker into an amplifier against the API server.
//! Cached verdicts never take from the bucket.

use std::sync::Mutex;
use std::time::Instant;

/// `rate` calls per second sustained, `burst` at once.
pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate.max(1)),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one call's worth at `now`; false when the bucket is empty.
    pub fn take(&self, now: Instant) -> bool {
        let mut st = self.state.lock().expect("lock");
        let (level, at) = *st;
        let level =
            (level + now.saturating_duration_since(at).as_secs_f64() * self.rate).min(self.burst);
        if level < 1.0 {
            *st = (level, now);
            return false;
        }
        *st = (level - 1.0, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let b = Bucket::new(10, 3);
        let t0 = Instant::now();
        assert!(b.take(t0) && b.take(t0) && b.take(t0), "the burst");
        assert!(!b.take(t0), "empty");
        assert!(!b.take(t0 + Duration::from_millis(50)), "half a token");
        assert!(b.take(t0 + Duration::from_millis(100)), "one per 100 ms");
        assert!(!b.take(t0 + Duration::from_millis(100)));
        // Refills up to the burst only.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(later) && b.take(later) && b.take(later));
        assert!(!b.take(later));
    }
}
