//! [`RetryPolicy`]: how many times a failing task is attempted, and how long to wait between
//! attempts.

use std::time::Duration;

/// How a task that fails (returns `Err`, panics or times out) is attempted again.
///
/// The default makes one attempt: no retry, no timeout. Retrying runs a fresh clone of the
/// task on a clone of its input, so it applies to tasks added with
/// [`DurableDag::add_fallible`](crate::DurableDag::add_fallible) or
/// [`DurableDag::add_with_retry`](crate::DurableDag::add_with_retry), whose bounds require
/// `Clone`.
///
/// Attempt `n + 1` starts after a backoff of `initial_backoff * 2^(n - 1)`, capped at
/// `max_backoff`; with jitter (the default) the wait is drawn uniformly from zero to that
/// value ("full jitter"), so tasks failing together do not retry in lockstep.
///
/// Backoff and timeouts use tokio's timer: a DAG with retries or timeouts must run inside a
/// tokio runtime with its time driver enabled (`enable_time` or `enable_all`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    jitter: bool,
    timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            jitter: true,
            timeout: None,
        }
    }
}

impl RetryPolicy {
    /// At most `max_attempts` attempts (at least one), 100 ms initial backoff doubling up to
    /// 30 s, with jitter and no timeout.
    pub fn attempts(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..RetryPolicy::default()
        }
    }

    /// Sets the wait before the second attempt, and the cap the doubling stops at.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> RetryPolicy {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Turns jitter on (the default) or off; without it the waits are exactly the doubling
    /// sequence.
    pub fn jitter(mut self, jitter: bool) -> RetryPolicy {
        self.jitter = jitter;
        self
    }

    /// Cuts every attempt off after `timeout`: the attempt is recorded as failed
    /// ("timed out") and retried like any other failure. The task's future is dropped.
    pub fn timeout(mut self, timeout: Duration) -> RetryPolicy {
        self.timeout = Some(timeout);
        self
    }

    /// The most attempts made at one task in one run.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The per-attempt timeout, if any.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The longest wait before attempt `next` (2 or more) without jitter.
    pub fn backoff_ceiling(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(31);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }

    /// The wait before attempt `next` (2 or more): the ceiling, or with jitter a uniform
    /// draw from zero to it.
    pub(crate) fn backoff_before(&self, next: u32) -> Duration {
        let ceiling = self.backoff_ceiling(next);
        if self.jitter {
            ceiling.mul_f64(fastrand::f64())
        } else {
            ceiling
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = RetryPolicy::attempts(10)
            .backoff(Duration::from_millis(10), Duration::from_millis(50))
            .jitter(false);
        let waits: Vec<u128> = (2..=6).map(|n| p.backoff_before(n).as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 50, 50]);
    }

    #[test]
    fn jitter_stays_within_the_ceiling() {
        let p =
            RetryPolicy::attempts(5).backoff(Duration::from_millis(100), Duration::from_secs(1));
        for n in 2..=5 {
            for _ in 0..100 {
                assert!(p.backoff_before(n) <= p.backoff_ceiling(n));
            }
        }
    }

    #[test]
    fn at_least_one_attempt_and_no_overflow() {
        assert_eq!(RetryPolicy::attempts(0).max_attempts(), 1);
        let p = RetryPolicy::attempts(u32::MAX).jitter(false);
        assert_eq!(p.backoff_before(u32::MAX), Duration::from_secs(30));
    }
}
