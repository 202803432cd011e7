//! Log lines whose frequency an outsider controls (refused joins, forged datagrams, peers of
//! another version) go through a [`LogThrottle`]: at most one line per interval, and the next
//! line says how many were left out, so a flood costs a bounded amount of log.

use std::time::{Duration, Instant};

/// At most one log line per `every`; counts what it held back. Time is passed in.
#[derive(Debug, Clone)]
pub struct LogThrottle {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl LogThrottle {
    /// A throttle allowing one line per `every`.
    pub const fn new(every: Duration) -> Self {
        LogThrottle {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one; `None` when this one must be held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.every)
        {
            self.held_back = self.held_back.saturating_add(1);
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count() {
        let t0 = Instant::now();
        let mut t = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(t.allow(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(t.allow(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(t.allow(t0 + Duration::from_secs(11)), None);
    }
}
