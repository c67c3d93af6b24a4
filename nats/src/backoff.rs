//! One backoff for every retry loop of the roles (the relay, the MQTT connections of ingest and
//! dispatch, the bridge's retries, the consumers' set-up): waits that double from a first delay
//! up to a ceiling, cut short by the shutdown, from backon's exponential backoff.
//!
//! Each wait is the delay plus up to as much again at random (backon's jitter), so instances
//! that lost the same server do not all come back in the same instant; no wait is ever longer
//! than the ceiling.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Doubling waits between retries. See the module documentation.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    ceiling: Duration,
}

impl Backoff {
    /// Waits from `first`, doubling up to `ceiling` (each plus its jitter, within the ceiling).
    pub fn new(first: Duration, ceiling: Duration) -> Self {
        let ceiling = ceiling.max(first);
        let builder = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(ceiling)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            ceiling,
        }
    }

    /// Back to the first delay: the thing retried worked.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        // Without a limit of attempts the delays never run out. backon adds the jitter after
        // its own ceiling: keep the wait within ours.
        self.delays.next().unwrap_or(self.ceiling).min(self.ceiling)
    }

    /// Sleeps the next wait. `false` when `shutdown` fired first: stop retrying.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        sleep_unless_shut_down(delay, shutdown).await
    }
}

/// Sleeps `delay` (one [`Backoff::next_delay`], say, after logging it). `false` when
/// `shutdown` fired first.
pub async fn sleep_unless_shut_down(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_ceiling_with_at_most_as_much_again_of_jitter() {
        let first = Duration::from_millis(100);
        let ceiling = Duration::from_secs(1);
        let mut backoff = Backoff::new(first, ceiling);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        let bases = [100, 200, 400, 800, 1000, 1000, 1000, 1000].map(Duration::from_millis);
        for (delay, base) in delays.iter().zip(bases) {
            let most = (base * 2).min(ceiling);
            assert!(
                *delay >= base && *delay <= most,
                "{delay:?} not in [{base:?}, {most:?}]"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= first * 2);
    }

    #[test]
    fn a_ceiling_below_the_first_delay_is_the_first_delay() {
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::ZERO);
        for _ in 0..4 {
            assert_eq!(backoff.next_delay(), Duration::from_secs(2));
        }
    }

    #[tokio::test]
    async fn a_shutdown_cuts_the_wait_short() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut backoff = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        assert!(!backoff.wait(&shutdown).await);
    }
}
