//! The facts a rollout records.

use super::*;

/// A fact about a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RolloutEvent {
    /// A rollout was planned.
    RolloutCreated {
        /// Its id.
        rollout_id: RolloutId,
        /// Its tenant.
        tenant: TenantId,
        /// The image.
        firmware_id: FirmwareId,
        /// Target devices in wave order.
        targets: Vec<DeviceId>,
        /// Cumulative wave boundaries in percent; empty when the plan gave sizes.
        waves: Vec<u8>,
        /// Devices per wave, adding up to the targets (a remainder wave included); empty when
        /// the plan gave percentages.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        wave_sizes: Vec<usize>,
        /// Success threshold in percent.
        success_threshold: u8,
        /// Error threshold in percent.
        error_threshold: u8,
        /// What exceeding the error threshold does.
        #[serde(default)]
        on_error: ErrorAction,
        /// Per-device timeout in seconds.
        device_timeout_secs: u64,
        /// Window for offline devices in seconds.
        #[serde(default = "default_window_secs")]
        window_secs: u64,
        /// When.
        at: DateTime<Utc>,
    },
    /// The rollout began.
    RolloutStarted {
        /// When.
        at: DateTime<Utc>,
    },
    /// A wave began: these devices are to be updated now.
    WaveStarted {
        /// The wave's index, from 0.
        wave: usize,
        /// Its devices.
        devices: Vec<DeviceId>,
        /// For a later wave, the counts of the wave before that let it start.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counts: Option<Counts>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The update was sent to these devices.
    DevicesSent {
        /// The devices.
        devices: Vec<DeviceId>,
        /// When.
        at: DateTime<Utc>,
    },
    /// A device recorded as sent could not take the update now and waits in the queue again.
    DeviceReturnedToQueue {
        /// The device.
        device_id: DeviceId,
        /// Why it waits.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The update ended on one device.
    DeviceOutcomeRecorded {
        /// The device.
        device_id: DeviceId,
        /// How it ended.
        outcome: DeviceOutcome,
        /// When.
        at: DateTime<Utc>,
    },
    /// The rollout was paused.
    RolloutPaused {
        /// Why.
        reason: String,
        /// Whether a threshold paused it, rather than a person.
        automatic: bool,
        /// The counts when it paused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counts: Option<Counts>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The rollout continues.
    RolloutResumed {
        /// When.
        at: DateTime<Utc>,
    },
    /// The rollout was stopped for good.
    RolloutAborted {
        /// Why.
        reason: String,
        /// Whether the error threshold aborted it, rather than a person.
        #[serde(default)]
        automatic: bool,
        /// Devices left without an outcome: those not sent the update never will be, those
        /// sent are told to give it up.
        #[serde(default)]
        canceled: usize,
        /// The counts when it stopped.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counts: Option<Counts>,
        /// When.
        at: DateTime<Utc>,
    },
    /// Every device has its outcome.
    RolloutCompleted {
        /// Devices that succeeded.
        succeeded: usize,
        /// Devices that failed or timed out.
        failed: usize,
        /// The final counts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counts: Option<Counts>,
        /// When.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for RolloutEvent {
    fn event_type(&self) -> String {
        match self {
            Self::RolloutCreated { .. } => "RolloutCreated",
            Self::RolloutStarted { .. } => "RolloutStarted",
            Self::WaveStarted { .. } => "WaveStarted",
            Self::DevicesSent { .. } => "DevicesSent",
            Self::DeviceReturnedToQueue { .. } => "DeviceReturnedToQueue",
            Self::DeviceOutcomeRecorded { .. } => "DeviceOutcomeRecorded",
            Self::RolloutPaused { .. } => "RolloutPaused",
            Self::RolloutResumed { .. } => "RolloutResumed",
            Self::RolloutAborted { .. } => "RolloutAborted",
            Self::RolloutCompleted { .. } => "RolloutCompleted",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
