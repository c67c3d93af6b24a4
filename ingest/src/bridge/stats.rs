//! What the bridge counts: messages received, redelivered, accepted, refused, and whether it
//! is connected; logged as a summary and exported as `fleetlog_ingest_*`.

use super::*;

/// Running totals, for the summary line and for tests.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub(super) started: std::sync::OnceLock<Instant>,
    pub(super) connected: AtomicBool,
    pub(super) received: AtomicU64,
    pub(super) accepted: AtomicU64,
    pub(super) partially_accepted: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) redelivered: AtomicU64,
    pub(super) last_message_ms: AtomicI64,
}

impl IngestStats {
    /// Messages received.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    /// Messages fully accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Messages accepted with parts dropped.
    pub fn partially_accepted(&self) -> u64 {
        self.partially_accepted.load(Ordering::Relaxed)
    }
    /// Messages dead-lettered.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
    /// Messages the broker marked as possibly delivered before (DUP).
    pub fn redelivered(&self) -> u64 {
        self.redelivered.load(Ordering::Relaxed)
    }
    /// Whether the client is connected to the broker.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(super) fn record(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Accepted => &self.accepted,
            Outcome::PartiallyAccepted => &self.partially_accepted,
            Outcome::Rejected => &self.rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("fleetlog_ingest_messages_total",
            "transport" => "mqtt", "outcome" => outcome.label())
        .increment(1);
    }

    pub(super) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        metrics::gauge!("fleetlog_ingest_connected").set(if connected { 1.0 } else { 0.0 });
    }

    /// Refreshes the gauges and, if `log`, writes the summary line.
    pub(super) fn report(&self, log: bool) {
        let received = self.received();
        let handled = self.accepted() + self.partially_accepted() + self.rejected();
        let success_rate = if handled == 0 {
            100.0
        } else {
            100.0 * (self.accepted() + self.partially_accepted()) as f64 / handled as f64
        };
        let last = self.last_message_ms.load(Ordering::Relaxed);
        let last_message = (last > 0)
            .then(|| DateTime::<Utc>::from_timestamp_millis(last))
            .flatten()
            .map_or_else(|| "never".to_string(), |time| time.to_rfc3339());
        let uptime = self.started.get().map_or(0, |s| s.elapsed().as_secs());
        metrics::gauge!("fleetlog_ingest_uptime_seconds").set(uptime as f64);
        metrics::gauge!("fleetlog_ingest_success_ratio").set(success_rate / 100.0);
        if !log {
            return;
        }
        tracing::info!(
            uptime_secs = uptime,
            connected = self.is_connected(),
            total = received,
            accepted = self.accepted(),
            partially_accepted = self.partially_accepted(),
            rejected = self.rejected(),
            success_rate = format!("{success_rate:.2}%"),
            last_message,
            "ingest summary"
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Accepted,
    PartiallyAccepted,
    Rejected,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::PartiallyAccepted => "partially_accepted",
            Outcome::Rejected => "rejected",
        }
    }
}
