//! How fleetlog keeps its long-running loops alive: the supervision policy of every role
//! (relay, each projection worker, liveness, the rollout manager, ingest, dispatch, the API),
//! whether they share a process (`fleetlog up`) or not. It lives here because every role
//! depends on this crate.
//!
//! The policy: a unit that panics is restarted, after a delay that starts at one to two
//! seconds and doubles up to a minute ([`crate::Backoff`]; back to the start once it ran five
//! minutes without panicking), with an error log line carrying the panic message and the counter
//! `fleetlog_role_restarts_total{unit}`. One unit's panic therefore never stops the others, and
//! never stops silently. A unit that returns an error (a setting that cannot work, say) is not
//! restarted: the error ends the process with a non-zero exit, as a misconfiguration should.
//! Restarting is safe because every unit keeps its progress outside the process (cursors,
//! positions, acks, the event store) and starts from there.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::Backoff;
use tokio_util::sync::CancellationToken;

/// The first delay before a restart.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest delay before a restart.
const MAX_DELAY: Duration = Duration::from_secs(60);
/// A unit that ran this long without panicking starts again from the first delay.
const HEALTHY_AFTER: Duration = Duration::from_secs(300);

/// Runs the unit `start` makes until it returns, restarting it whenever it panics (see the
/// module). Returns the unit's own result, or `Ok` once `shutdown` is cancelled while it waits
/// to restart.
pub async fn supervise<F, Fut, E>(
    unit: &'static str,
    shutdown: CancellationToken,
    mut start: F,
) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let mut backoff = Backoff::new(FIRST_DELAY, MAX_DELAY);
    loop {
        let started = Instant::now();
        // The unit runs as a task of its own so a panic is caught; the guard aborts it when
        // the supervisor itself is dropped or aborted, so no unit outlives its supervisor.
        let mut unit_task = AbortOnDrop(tokio::spawn(start()));
        match (&mut unit_task.0).await {
            Ok(result) => return result,
            Err(error) => {
                let message = match error.try_into_panic() {
                    Ok(panic) => panic_message(panic.as_ref()),
                    // Cancelled: only a runtime shutting down does that.
                    Err(_) => return Ok(()),
                };
                if started.elapsed() >= HEALTHY_AFTER {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                metrics::counter!("fleetlog_role_restarts_total", "unit" => unit).increment(1);
                tracing::error!(
                    unit,
                    panic = message,
                    restart_in = ?delay,
                    "a unit panicked; restarting it"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_unit_is_restarted_until_it_returns() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let result: Result<(), String> = supervise("test", CancellationToken::new(), move || {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if run < 3 {
                    panic!("run {run} fails");
                }
                Ok(())
            }
        })
        .await;
        assert_eq!(result, Ok(()));
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_is_returned_and_not_retried() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let result = supervise("test", CancellationToken::new(), move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("misconfigured".to_string()) }
        })
        .await;
        assert_eq!(result, Err("misconfigured".to_string()));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_wait_for_a_restart() {
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        let result: Result<(), String> = supervise("test", shutdown, move || {
            cancel.cancel();
            async { panic!("always") }
        })
        .await;
        assert_eq!(result, Ok(()));
    }
}
