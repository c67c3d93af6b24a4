//! The Rollout aggregate: installing one firmware image on a set of devices, wave by wave.
//!
//! A rollout is created with its targets split into waves (cumulative percentages, e.g.
//! `[5, 25, 100]`, or device counts, e.g. `[5, 50]` with the rest in a last wave), a success
//! threshold a wave must reach before the next one starts, an error threshold past which the
//! rollout pauses or aborts itself (as configured), a per-device timeout for stuck installs and
//! a window within which a device offline at its wave's start may still be updated.
//!
//! The aggregate records every decision with the counts that justified it: a wave started
//! (advance), paused, aborted, completed. It records which devices the update was sent to, so a
//! restarted process manager neither sends twice nor skips a device, and each device's outcome.
//! The process manager that sends updates and watches timeouts lives in `projections`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::firmware::FirmwareId;
use crate::ids::{DeviceId, RolloutId, TenantId};
use crate::limits::deadline;

/// The most devices one rollout may target; larger fleets are rolled out in several rollouts.
pub const MAX_TARGETS: usize = 100_000;

/// The most waves one rollout may have.
pub const MAX_WAVES: usize = 100;

/// How a rollout's targets, in order, split into waves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Waves {
    /// Cumulative percentages of the targets, strictly rising to 100: `[10, 50, 100]` puts
    /// the first tenth in wave 0, up to half in wave 1, the rest in wave 2.
    Percentages(Vec<u8>),
    /// Devices per wave: `[5, 50]` puts the first 5 targets in wave 0, the next 50 in wave 1
    /// and any left over in one last wave. Every size is at least 1; sizes past the targets
    /// are clamped, and waves left with no device dropped.
    Sizes(Vec<usize>),
}

/// The window of a rollout that does not name one: a week.
pub const DEFAULT_WINDOW_SECS: u64 = 7 * 24 * 3600;
/// The longest a device may be given to finish its update: 30 days.
pub const MAX_DEVICE_TIMEOUT_SECS: u64 = 30 * 24 * 3600;
/// The longest window for reaching offline devices after their wave started: 365 days.
pub const MAX_WINDOW_SECS: u64 = 365 * 24 * 3600;

/// Where a rollout is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutStatus {
    /// Not created yet.
    #[default]
    Unplanned,
    /// Created, not started.
    Created,
    /// Sending updates.
    Running,
    /// Stopped by hand or by a threshold; may resume.
    Paused,
    /// Every device has its outcome.
    Completed,
    /// Stopped for good.
    Aborted,
}

impl fmt::Display for RolloutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Unplanned => "unplanned",
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Aborted => "aborted",
        };
        f.write_str(name)
    }
}

/// What the error threshold does when a wave exceeds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorAction {
    /// Pause; an operator looks and resumes or aborts.
    #[default]
    Pause,
    /// Abort: devices not sent yet are canceled.
    Abort,
}

/// How the update ended on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceOutcome {
    /// The device reported running the new firmware.
    Succeeded,
    /// The device reported a failure.
    Failed {
        /// What it reported.
        error: String,
    },
    /// The device did not finish within the per-device timeout, or was not reachable within
    /// the rollout's window.
    TimedOut,
    /// The device left the rollout without an attempt: decommissioned, or its model no longer
    /// fits the image. Neither a success nor a failure: thresholds judge a wave without it.
    Canceled {
        /// Why.
        reason: String,
    },
}

/// Outcomes so far in one wave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveTally {
    /// Devices that run the new firmware.
    pub succeeded: usize,
    /// Devices that reported a failure.
    pub failed: usize,
    /// Devices that timed out.
    pub timed_out: usize,
    /// Devices canceled without an attempt.
    #[serde(default)]
    pub canceled: usize,
}

impl WaveTally {
    fn add(&mut self, outcome: &DeviceOutcome) {
        match outcome {
            DeviceOutcome::Succeeded => self.succeeded += 1,
            DeviceOutcome::Failed { .. } => self.failed += 1,
            DeviceOutcome::TimedOut => self.timed_out += 1,
            DeviceOutcome::Canceled { .. } => self.canceled += 1,
        }
    }

    /// Failures that count against the error threshold.
    fn failures(&self) -> usize {
        self.failed + self.timed_out
    }

    /// Devices with an outcome, canceled ones included.
    fn finished(&self) -> usize {
        self.succeeded + self.failures() + self.canceled
    }
}

/// A wave an operator accepted by resuming while it ran: the success threshold no longer
/// holds it (it leads to the next wave once every device in it has an outcome), and the
/// error threshold judges only what fails after the resume, among the devices that had no
/// outcome then.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedWave {
    /// The wave.
    pub wave: usize,
    /// Its outcomes at the resume.
    pub tally: WaveTally,
}

/// The counts behind a decision: the wave it was taken on and the whole rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// The wave judged.
    pub wave: usize,
    /// Its devices.
    pub wave_size: usize,
    /// Its outcomes.
    pub wave_succeeded: usize,
    /// Its failures reported by devices.
    pub wave_failed: usize,
    /// Its timeouts.
    pub wave_timed_out: usize,
    /// Its devices canceled without an attempt, which the thresholds leave out.
    #[serde(default)]
    pub wave_canceled: usize,
    /// Targets of the rollout.
    pub targets: usize,
    /// Devices the update was sent to.
    pub sent: usize,
    /// Devices that run the new firmware.
    pub succeeded: usize,
    /// Devices that reported a failure.
    pub failed: usize,
    /// Devices that timed out.
    pub timed_out: usize,
    /// Devices canceled without an attempt.
    #[serde(default)]
    pub canceled: usize,
    /// Devices without an outcome.
    pub pending: usize,
}

/// Device id to its index in `targets`, built on first use: waves are index ranges, so this
/// finds a device's wave without scanning a list of up to [`MAX_TARGETS`].
#[derive(Debug, Clone, Default)]
struct TargetIndex(OnceLock<HashMap<DeviceId, usize>>);

impl PartialEq for TargetIndex {
    /// Derived from `targets`, which the aggregate compares.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The Rollout aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Its id.
    pub id: Option<RolloutId>,
    /// Its tenant.
    pub tenant: Option<TenantId>,
    /// The image to install.
    pub firmware_id: Option<FirmwareId>,
    /// Target devices in wave order.
    pub targets: Vec<DeviceId>,
    /// Cumulative wave boundaries in percent, the last one 100; empty when the plan gave
    /// sizes.
    pub waves: Vec<u8>,
    /// Devices per wave, adding up to the targets; empty when the plan gave percentages.
    #[serde(default)]
    pub wave_sizes: Vec<usize>,
    /// Percent of a wave that must succeed before the next wave.
    pub success_threshold: u8,
    /// Percent of a wave that may fail before the error action.
    pub error_threshold: u8,
    /// What exceeding the error threshold does.
    #[serde(default)]
    pub on_error: ErrorAction,
    /// Seconds a device has to finish its update once sent.
    pub device_timeout_secs: u64,
    /// Seconds after its wave started within which an offline device may still be sent the
    /// update; after that it times out.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Created, running, paused, completed or aborted.
    pub status: RolloutStatus,
    /// The latest wave started, if any.
    pub current_wave: Option<usize>,
    /// When each started wave started.
    #[serde(default)]
    pub wave_started_at: Vec<DateTime<Utc>>,
    /// Devices the update was sent to, and when.
    #[serde(default)]
    pub sent: BTreeMap<DeviceId, DateTime<Utc>>,
    /// Outcome per device that finished.
    pub outcomes: BTreeMap<DeviceId, DeviceOutcome>,
    /// Outcomes per wave.
    #[serde(default)]
    pub tallies: Vec<WaveTally>,
    /// The wave an operator accepted by resuming while it ran, with its outcomes then.
    #[serde(default)]
    pub accepted: Option<AcceptedWave>,
    /// When the rollout was aborted: outcomes devices reported before it still count.
    #[serde(default)]
    pub aborted_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    index: TargetIndex,
}

fn default_window_secs() -> u64 {
    DEFAULT_WINDOW_SECS
}

/// A request to the Rollout aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RolloutCommand {
    /// Plan a rollout.
    Create {
        /// Its id.
        rollout_id: RolloutId,
        /// Its tenant.
        tenant: TenantId,
        /// The image to install (released, checked by the caller).
        firmware_id: FirmwareId,
        /// Target devices, in the order they are rolled out.
        targets: Vec<DeviceId>,
        /// How the targets split into waves.
        waves: Waves,
        /// Percent of a wave that must succeed before the next one, 1 to 100.
        success_threshold: u8,
        /// Percent of a wave that may fail before the error action, 0 to 100.
        error_threshold: u8,
        /// What exceeding the error threshold does.
        on_error: ErrorAction,
        /// Seconds a device has to finish once sent, at least 1.
        device_timeout_secs: u64,
        /// Seconds after its wave started within which an offline device may still be
        /// updated, at least 1.
        window_secs: u64,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Start the first wave.
    Start {
        /// Now.
        at: DateTime<Utc>,
    },
    /// Record that the update is being sent to these devices. Devices not due (their wave has
    /// not started, or they were sent or finished already) are left out, so a repeated command
    /// changes nothing.
    SendToDevices {
        /// The devices.
        devices: Vec<DeviceId>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Put a device recorded as sent back in the queue: it could not take the update now
    /// (another update is under way on it), which is neither its success nor its failure.
    ReturnToQueue {
        /// The device.
        device_id: DeviceId,
        /// Why it waits.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Record how the update ended on one device; the rollout may advance, pause, abort or
    /// complete as a result.
    RecordDeviceOutcome {
        /// The device.
        device_id: DeviceId,
        /// How it ended.
        outcome: DeviceOutcome,
        /// When the device reported it, if it did (else `at`): what it reported before an
        /// abort still counts.
        #[serde(default)]
        reported_at: Option<DateTime<Utc>>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Start the next wave once the current one reached the success threshold.
    AdvanceWave {
        /// Now.
        at: DateTime<Utc>,
    },
    /// Stop sending updates for now.
    Pause {
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Continue after a pause. The current wave is taken as accepted by the operator: its
    /// thresholds no longer pause it, and once every device in it has an outcome (now or
    /// later) the next one starts.
    Resume {
        /// Now.
        at: DateTime<Utc>,
    },
    /// Stop for good; every device without an outcome is canceled (the rollout manager tells
    /// those sent to give the update up).
    Abort {
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Close a rollout whose last wave is done.
    Complete {
        /// Now.
        at: DateTime<Utc>,
    },
}

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

/// Why the Rollout aggregate refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// The id is taken.
    #[error("rollout already exists")]
    AlreadyCreated,
    /// No target device.
    #[error("a rollout needs at least one target device")]
    NoTargets,
    /// More than [`MAX_TARGETS`] targets.
    #[error("a rollout targets at most {MAX_TARGETS} devices")]
    TooManyTargets,
    /// A device listed twice.
    #[error("device {0} is targeted twice")]
    DuplicateTarget(DeviceId),
    /// Wave boundaries that do not rise strictly to 100.
    #[error("waves must be cumulative percentages rising strictly to 100, e.g. [10, 50, 100]")]
    InvalidWaves,
    /// Wave sizes that are empty, zero, or more waves than allowed (a remainder wave included).
    #[error("wave sizes must be 1 to {MAX_WAVES} device counts of at least 1, the rest of the {0} targets included")]
    InvalidWaveSizes(usize),
    /// A threshold out of range.
    #[error("success threshold must be 1 to 100 and error threshold 0 to 100")]
    InvalidThreshold,
    /// A per-device timeout or window out of range.
    #[error("device_timeout_secs must be 1 to {MAX_DEVICE_TIMEOUT_SECS} (30 days) and window_secs 1 to {MAX_WINDOW_SECS} (365 days)")]
    InvalidTimeout,
    /// The command does not fit the rollout's status.
    #[error("cannot {action} a rollout that is {from}")]
    InvalidTransition {
        /// The rollout's status.
        from: RolloutStatus,
        /// What was asked.
        action: &'static str,
    },
    /// An outcome for a device the rollout does not target.
    #[error("device {0} is not a target of this rollout")]
    UnknownDevice(DeviceId),
    /// An outcome for a device whose wave has not started.
    #[error("device {0} belongs to a wave that has not started")]
    WaveNotStarted(DeviceId),
    /// A device's report of an update it was never sent.
    #[error("the update was not sent to device {0}")]
    NotSent(DeviceId),
    /// A timeout recorded before the device's time is up.
    #[error("device {0} has not used up its time yet")]
    NotTimedOut(DeviceId),
    /// An outcome after the rollout was aborted, for a device it never sent to or one that
    /// reported after the abort.
    #[error("device {0} was canceled")]
    Canceled(DeviceId),
    /// A device put back in the queue that is not waiting for its outcome.
    #[error("device {0} is not waiting for its update")]
    NotInFlight(DeviceId),
    /// The current wave is below the success threshold.
    #[error("wave {wave} has {succeeded_percent}% successes, the threshold is {threshold}%")]
    ThresholdNotReached {
        /// The wave.
        wave: usize,
        /// Its share of successes.
        succeeded_percent: u8,
        /// The threshold.
        threshold: u8,
    },
    /// Advance past the last wave.
    #[error("the last wave is running: complete the rollout instead")]
    NoMoreWaves,
    /// Completion before every wave is started and every device done.
    #[error("{0} devices have no outcome yet")]
    OutcomesPending(usize),
    /// An empty or overlong reason.
    #[error("reason must be 1 to 512 characters")]
    InvalidReason,
}

crate::aggregate!(
    Rollout,
    "rollout",
    RolloutCommand,
    RolloutEvent,
    RolloutError
);

/// The index range of `targets` that wave `wave` covers, under cumulative percentages
/// `waves` or, when given, the device counts `sizes`.
fn wave_range(
    target_count: usize,
    waves: &[u8],
    sizes: &[usize],
    wave: usize,
) -> std::ops::Range<usize> {
    if !sizes.is_empty() {
        let start = sizes[..wave].iter().sum();
        return start..start + sizes[wave];
    }
    let end_of = |i: usize| (target_count * usize::from(waves[i])).div_ceil(100);
    let start = if wave == 0 { 0 } else { end_of(wave - 1) };
    start..end_of(wave)
}

/// `part` of `whole` in whole percent, rounded down.
fn percent(part: usize, whole: usize) -> u8 {
    u8::try_from(part * 100 / whole.max(1)).unwrap_or(100)
}

impl Rollout {
    /// Folds one event into the state.
    pub fn evolve(&mut self, event: <Self as cqrs_es::Aggregate>::Event) {
        match event {
            RolloutEvent::RolloutCreated {
                rollout_id,
                tenant,
                firmware_id,
                targets,
                waves,
                wave_sizes,
                success_threshold,
                error_threshold,
                on_error,
                device_timeout_secs,
                window_secs,
                ..
            } => {
                self.id = Some(rollout_id);
                self.tenant = Some(tenant);
                self.firmware_id = Some(firmware_id);
                self.targets = targets;
                self.waves = waves;
                self.wave_sizes = wave_sizes;
                self.tallies = vec![WaveTally::default(); self.wave_count()];
                self.success_threshold = success_threshold;
                self.error_threshold = error_threshold;
                self.on_error = on_error;
                self.device_timeout_secs = device_timeout_secs;
                self.window_secs = window_secs;
                self.status = RolloutStatus::Created;
                self.index = TargetIndex::default();
            }
            RolloutEvent::RolloutStarted { .. } => self.status = RolloutStatus::Running,
            RolloutEvent::RolloutResumed { .. } => {
                self.status = RolloutStatus::Running;
                self.accepted = self.current_wave.map(|wave| AcceptedWave {
                    wave,
                    tally: self.tallies.get(wave).copied().unwrap_or_default(),
                });
            }
            RolloutEvent::WaveStarted { wave, at, .. } => {
                self.current_wave = Some(wave);
                self.wave_started_at.truncate(wave);
                self.wave_started_at.push(at);
            }
            RolloutEvent::DevicesSent { devices, at } => {
                self.sent.extend(devices.into_iter().map(|d| (d, at)));
            }
            RolloutEvent::DeviceReturnedToQueue { device_id, .. } => {
                self.sent.remove(&device_id);
            }
            RolloutEvent::DeviceOutcomeRecorded {
                device_id, outcome, ..
            } => {
                if let Some(wave) = self.wave_of(&device_id) {
                    if let Some(tally) = self.tallies.get_mut(wave) {
                        tally.add(&outcome);
                    }
                }
                self.outcomes.insert(device_id, outcome);
            }
            RolloutEvent::RolloutPaused { .. } => self.status = RolloutStatus::Paused,
            RolloutEvent::RolloutAborted { at, .. } => {
                self.status = RolloutStatus::Aborted;
                self.aborted_at = Some(at);
            }
            RolloutEvent::RolloutCompleted { .. } => self.status = RolloutStatus::Completed,
        }
    }

    /// How many waves the rollout has.
    pub fn wave_count(&self) -> usize {
        if self.wave_sizes.is_empty() {
            self.waves.len()
        } else {
            self.wave_sizes.len()
        }
    }

    /// The devices of wave `wave`, in order.
    pub fn wave_devices(&self, wave: usize) -> &[DeviceId] {
        &self.targets[self.wave_range(wave)]
    }

    fn wave_range(&self, wave: usize) -> std::ops::Range<usize> {
        wave_range(self.targets.len(), &self.waves, &self.wave_sizes, wave)
    }

    /// The index of the wave that holds `device`.
    pub fn wave_of(&self, device: &DeviceId) -> Option<usize> {
        let index = self.index.0.get_or_init(|| {
            self.targets
                .iter()
                .enumerate()
                .map(|(i, d)| (d.clone(), i))
                .collect()
        });
        let position = *index.get(device)?;
        (0..self.wave_count()).find(|w| self.wave_range(*w).contains(&position))
    }

    /// Whether `device`'s wave has started.
    pub fn is_due(&self, device: &DeviceId) -> bool {
        matches!((self.wave_of(device), self.current_wave), (Some(w), Some(c)) if w <= c)
    }

    /// The counts of wave `wave` and of the whole rollout under `tallies`.
    pub fn counts(&self, wave: usize) -> Counts {
        self.counts_with(&self.tallies, wave)
    }

    fn counts_with(&self, tallies: &[WaveTally], wave: usize) -> Counts {
        let tally = tallies.get(wave).copied().unwrap_or_default();
        let total = tallies
            .iter()
            .fold(WaveTally::default(), |sum, t| WaveTally {
                succeeded: sum.succeeded + t.succeeded,
                failed: sum.failed + t.failed,
                timed_out: sum.timed_out + t.timed_out,
                canceled: sum.canceled + t.canceled,
            });
        Counts {
            wave,
            wave_size: self.wave_devices(wave).len(),
            wave_succeeded: tally.succeeded,
            wave_failed: tally.failed,
            wave_timed_out: tally.timed_out,
            wave_canceled: tally.canceled,
            targets: self.targets.len(),
            sent: self.sent.len(),
            succeeded: total.succeeded,
            failed: total.failed,
            timed_out: total.timed_out,
            canceled: total.canceled,
            pending: self.targets.len() - total.finished(),
        }
    }

    /// The devices of wave `wave` that its thresholds judge: the canceled ones left out.
    fn judged_size(&self, tallies: &[WaveTally], wave: usize) -> usize {
        self.wave_devices(wave).len() - tallies[wave].canceled
    }

    fn ensure_wave_succeeded(&self, wave: usize) -> Result<(), RolloutError> {
        let size = self.judged_size(&self.tallies, wave);
        let succeeded = self.tallies[wave].succeeded;
        if succeeded * 100 < usize::from(self.success_threshold) * size {
            return Err(RolloutError::ThresholdNotReached {
                wave,
                succeeded_percent: percent(succeeded, size),
                threshold: self.success_threshold,
            });
        }
        Ok(())
    }

    fn transition(&self, action: &'static str) -> RolloutError {
        RolloutError::InvalidTransition {
            from: self.status,
            action,
        }
    }

    /// Devices without an outcome: the ones an abort cancels.
    pub fn outstanding(&self) -> impl Iterator<Item = &DeviceId> {
        self.targets
            .iter()
            .filter(|d| !self.outcomes.contains_key(*d))
    }

    /// Devices sent the update that have no outcome yet: the ones an abort tells to give it up.
    pub fn in_flight(&self) -> impl Iterator<Item = &DeviceId> {
        self.sent.keys().filter(|d| !self.outcomes.contains_key(*d))
    }

    /// Decides which events a command produces, without changing the aggregate.
    pub fn decide(&self, command: RolloutCommand) -> Result<Vec<RolloutEvent>, RolloutError> {
        let events = self.decide_one(command)?;
        Ok(self.with_follow_ups(events))
    }

    /// A wave that starts with every device already done (all canceled before it started)
    /// is judged at once, and so on: otherwise nothing would ever judge it.
    fn with_follow_ups(&self, mut events: Vec<RolloutEvent>) -> Vec<RolloutEvent> {
        if !matches!(events.last(), Some(RolloutEvent::WaveStarted { .. })) {
            return events;
        }
        let mut state = self.clone();
        for event in &events {
            state.evolve(event.clone());
        }
        while let Some(RolloutEvent::WaveStarted { at, .. }) = events.last() {
            let at = *at;
            if state.status != RolloutStatus::Running {
                break;
            }
            let Some(next) = state.judge(&state.tallies, None, false, at) else {
                break;
            };
            state.evolve(next.clone());
            events.push(next);
        }
        events
    }

    fn decide_one(&self, command: RolloutCommand) -> Result<Vec<RolloutEvent>, RolloutError> {
        match command {
            RolloutCommand::Create {
                rollout_id,
                tenant,
                firmware_id,
                targets,
                waves,
                success_threshold,
                error_threshold,
                on_error,
                device_timeout_secs,
                window_secs,
                at,
            } => {
                if self.status != RolloutStatus::Unplanned {
                    return Err(RolloutError::AlreadyCreated);
                }
                let (waves, wave_sizes) = validate_plan(&targets, waves)?;
                if !(1..=100).contains(&success_threshold) || error_threshold > 100 {
                    return Err(RolloutError::InvalidThreshold);
                }
                if !(1..=MAX_DEVICE_TIMEOUT_SECS).contains(&device_timeout_secs)
                    || !(1..=MAX_WINDOW_SECS).contains(&window_secs)
                {
                    return Err(RolloutError::InvalidTimeout);
                }
                Ok(vec![RolloutEvent::RolloutCreated {
                    rollout_id,
                    tenant,
                    firmware_id,
                    targets,
                    waves,
                    wave_sizes,
                    success_threshold,
                    error_threshold,
                    on_error,
                    device_timeout_secs,
                    window_secs,
                    at,
                }])
            }
            RolloutCommand::Start { at } => {
                if self.status != RolloutStatus::Created {
                    return Err(self.transition("start"));
                }
                Ok(vec![
                    RolloutEvent::RolloutStarted { at },
                    RolloutEvent::WaveStarted {
                        wave: 0,
                        devices: self.wave_devices(0).to_vec(),
                        counts: None,
                        at,
                    },
                ])
            }
            RolloutCommand::SendToDevices { devices, at } => {
                if self.status != RolloutStatus::Running {
                    return Err(self.transition("send updates in"));
                }
                let mut due = Vec::with_capacity(devices.len());
                let mut seen = HashSet::with_capacity(devices.len());
                for device in devices {
                    if self.wave_of(&device).is_none() {
                        return Err(RolloutError::UnknownDevice(device));
                    }
                    let fresh =
                        !self.sent.contains_key(&device) && !self.outcomes.contains_key(&device);
                    if fresh && self.is_due(&device) && seen.insert(device.clone()) {
                        due.push(device);
                    }
                }
                if due.is_empty() {
                    return Ok(vec![]);
                }
                Ok(vec![RolloutEvent::DevicesSent { devices: due, at }])
            }
            RolloutCommand::ReturnToQueue {
                device_id,
                reason,
                at,
            } => {
                validate_reason(&reason)?;
                if !matches!(self.status, RolloutStatus::Running | RolloutStatus::Paused) {
                    return Err(self.transition("return a device to the queue of"));
                }
                if !self.sent.contains_key(&device_id) || self.outcomes.contains_key(&device_id) {
                    return Err(RolloutError::NotInFlight(device_id));
                }
                Ok(vec![RolloutEvent::DeviceReturnedToQueue {
                    device_id,
                    reason,
                    at,
                }])
            }
            RolloutCommand::RecordDeviceOutcome {
                device_id,
                outcome,
                reported_at,
                at,
            } => self.record_outcome(device_id, outcome, reported_at.unwrap_or(at), at),
            RolloutCommand::AdvanceWave { at } => {
                if self.status != RolloutStatus::Running {
                    return Err(self.transition("advance"));
                }
                let current = self.current_wave.unwrap_or(0);
                if current + 1 >= self.wave_count() {
                    return Err(RolloutError::NoMoreWaves);
                }
                self.ensure_wave_succeeded(current)?;
                Ok(vec![self.next_wave(&self.tallies, current, at)])
            }
            RolloutCommand::Pause { reason, at } => {
                validate_reason(&reason)?;
                if self.status != RolloutStatus::Running {
                    return Err(self.transition("pause"));
                }
                Ok(vec![RolloutEvent::RolloutPaused {
                    reason,
                    automatic: false,
                    counts: Some(self.counts(self.current_wave.unwrap_or(0))),
                    at,
                }])
            }
            RolloutCommand::Resume { at } => {
                if self.status != RolloutStatus::Paused {
                    return Err(self.transition("resume"));
                }
                let mut events = vec![RolloutEvent::RolloutResumed { at }];
                events.extend(self.judge(&self.tallies, None, true, at));
                Ok(events)
            }
            RolloutCommand::Abort { reason, at } => {
                validate_reason(&reason)?;
                match self.status {
                    RolloutStatus::Created | RolloutStatus::Running | RolloutStatus::Paused => {
                        Ok(vec![self.aborted(&self.tallies, reason, false, at)])
                    }
                    _ => Err(self.transition("abort")),
                }
            }
            RolloutCommand::Complete { at } => {
                if self.status != RolloutStatus::Running {
                    return Err(self.transition("complete"));
                }
                let last = self.wave_count() - 1;
                let pending = self.counts(last).pending;
                if self.current_wave != Some(last) || pending > 0 {
                    return Err(RolloutError::OutcomesPending(pending));
                }
                Ok(vec![self.completed(&self.tallies, at)])
            }
        }
    }

    fn record_outcome(
        &self,
        device_id: DeviceId,
        outcome: DeviceOutcome,
        reported_at: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<Vec<RolloutEvent>, RolloutError> {
        let wave = self
            .wave_of(&device_id)
            .ok_or_else(|| RolloutError::UnknownDevice(device_id.clone()))?;
        if self.outcomes.contains_key(&device_id) {
            // A device's outcome is final; a repeated report changes nothing.
            return Ok(vec![]);
        }
        if let DeviceOutcome::Canceled { reason } = &outcome {
            // A target that left the rollout (decommissioned, another model) is canceled
            // whenever that is found, in any wave, before it is ever sent.
            validate_reason(reason)?;
            if !matches!(
                self.status,
                RolloutStatus::Created | RolloutStatus::Running | RolloutStatus::Paused
            ) {
                return Err(self.transition("cancel a device of"));
            }
        } else if !matches!(
            self.status,
            RolloutStatus::Running | RolloutStatus::Paused | RolloutStatus::Aborted
        ) {
            return Err(self.transition("record an outcome in"));
        } else if self.current_wave.is_none_or(|current| wave > current) {
            return Err(RolloutError::WaveNotStarted(device_id));
        }
        let sent_at = self.sent.get(&device_id).copied();
        if let Some(aborted_at) = self.aborted_at {
            // The abort canceled every device without an outcome; only what a device sent
            // the update reported before the abort still counts.
            let reported_before = matches!(
                outcome,
                DeviceOutcome::Succeeded | DeviceOutcome::Failed { .. }
            ) && reported_at <= aborted_at;
            if sent_at.is_none() || !reported_before {
                return Err(RolloutError::Canceled(device_id));
            }
        }
        match (&outcome, sent_at) {
            (DeviceOutcome::Canceled { .. }, _) => {}
            (DeviceOutcome::TimedOut, Some(sent_at)) => {
                // A deadline past the calendar never comes (rollouts created before the
                // bounds above may carry any number).
                if deadline(sent_at, self.device_timeout_secs).is_none_or(|due| at < due) {
                    return Err(RolloutError::NotTimedOut(device_id));
                }
            }
            // Never sent: the device stayed out of reach for the whole window.
            (DeviceOutcome::TimedOut, None) => {
                let started = self.wave_started_at.get(wave).copied();
                let due = started.and_then(|started| deadline(started, self.window_secs));
                if due.is_none_or(|due| at < due) {
                    return Err(RolloutError::NotTimedOut(device_id));
                }
            }
            (_, None) => return Err(RolloutError::NotSent(device_id)),
            (_, Some(_)) => {}
        }
        let mut tallies = self.tallies.clone();
        tallies[wave].add(&outcome);
        // A cancel is no failure, but it shrinks the wave the failures so far are judged
        // against.
        let failed_wave = (outcome != DeviceOutcome::Succeeded).then_some(wave);
        let mut events = vec![RolloutEvent::DeviceOutcomeRecorded {
            device_id,
            outcome,
            at,
        }];
        if self.status == RolloutStatus::Running {
            events.extend(self.judge(&tallies, failed_wave, false, at));
        }
        Ok(events)
    }

    /// The decision a running rollout takes with `tallies`, if any: pause or abort when the
    /// wave of a new failure (`failed_wave`) exceeds the error threshold; start the next wave
    /// when the current one reached the success threshold (or finished, when an operator
    /// resumed: `accept_finished`, or accepted it by an earlier resume); pause when the current
    /// wave finished below it; complete when every device has its outcome. Canceled devices
    /// count for neither threshold.
    fn judge(
        &self,
        tallies: &[WaveTally],
        failed_wave: Option<usize>,
        accept_finished: bool,
        at: DateTime<Utc>,
    ) -> Option<RolloutEvent> {
        if let Some(wave) = failed_wave {
            let (mut size, mut failures) =
                (self.judged_size(tallies, wave), tallies[wave].failures());
            if let Some(accepted) = self.accepted.filter(|accepted| accepted.wave == wave) {
                // What failed before the resume was accepted with the wave: only the devices
                // open then, and their failures since, are judged.
                size = size.saturating_sub(accepted.tally.succeeded + accepted.tally.failures());
                failures = failures.saturating_sub(accepted.tally.failures());
            }
            if failures * 100 > usize::from(self.error_threshold) * size {
                let reason = format!(
                    "error threshold exceeded: {failures} of {size} devices in wave {wave} failed or timed out (threshold {}%)",
                    self.error_threshold
                );
                return Some(match self.on_error {
                    ErrorAction::Pause => RolloutEvent::RolloutPaused {
                        reason,
                        automatic: true,
                        counts: Some(self.counts_with(tallies, wave)),
                        at,
                    },
                    ErrorAction::Abort => self.aborted(tallies, reason, true, at),
                });
            }
        }
        let current = self.current_wave?;
        let last = self.wave_count() - 1;
        let size = self.judged_size(tallies, current);
        let tally = tallies[current];
        let reached = tally.succeeded * 100 >= usize::from(self.success_threshold) * size;
        let finished = tally.finished() == self.wave_devices(current).len();
        let accepted = accept_finished
            || self
                .accepted
                .is_some_and(|accepted| accepted.wave == current);
        if current < last {
            if reached || (finished && accepted) {
                return Some(self.next_wave(tallies, current, at));
            }
            if finished {
                return Some(RolloutEvent::RolloutPaused {
                    reason: format!(
                        "wave {current} finished with {}% successes, below the {}% threshold",
                        percent(tally.succeeded, size),
                        self.success_threshold
                    ),
                    automatic: true,
                    counts: Some(self.counts_with(tallies, current)),
                    at,
                });
            }
            return None;
        }
        let all_finished =
            tallies.iter().map(WaveTally::finished).sum::<usize>() == self.targets.len();
        all_finished.then(|| self.completed(tallies, at))
    }

    fn next_wave(&self, tallies: &[WaveTally], current: usize, at: DateTime<Utc>) -> RolloutEvent {
        RolloutEvent::WaveStarted {
            wave: current + 1,
            devices: self.wave_devices(current + 1).to_vec(),
            counts: Some(self.counts_with(tallies, current)),
            at,
        }
    }

    fn aborted(
        &self,
        tallies: &[WaveTally],
        reason: String,
        automatic: bool,
        at: DateTime<Utc>,
    ) -> RolloutEvent {
        RolloutEvent::RolloutAborted {
            reason,
            automatic,
            // Every device without an outcome under `tallies`, which may hold one more than
            // the state does.
            canceled: self.targets.len() - tallies.iter().map(WaveTally::finished).sum::<usize>(),
            counts: Some(self.counts_with(tallies, self.current_wave.unwrap_or(0))),
            at,
        }
    }

    fn completed(&self, tallies: &[WaveTally], at: DateTime<Utc>) -> RolloutEvent {
        let counts = self.counts_with(tallies, self.wave_count() - 1);
        RolloutEvent::RolloutCompleted {
            succeeded: counts.succeeded,
            failed: counts.failed + counts.timed_out,
            counts: Some(counts),
            at,
        }
    }
}

/// Checks the targets and the wave plan; returns the plan as the event records it: the
/// percentages, or the sizes with a last wave for the targets the sizes leave over.
fn validate_plan(
    targets: &[DeviceId],
    waves: Waves,
) -> Result<(Vec<u8>, Vec<usize>), RolloutError> {
    if targets.is_empty() {
        return Err(RolloutError::NoTargets);
    }
    if targets.len() > MAX_TARGETS {
        return Err(RolloutError::TooManyTargets);
    }
    let mut seen = HashSet::with_capacity(targets.len());
    if let Some(duplicate) = targets.iter().find(|d| !seen.insert(*d)) {
        return Err(RolloutError::DuplicateTarget(duplicate.clone()));
    }
    match waves {
        Waves::Percentages(waves) => {
            let rising = waves.windows(2).all(|w| w[0] < w[1]);
            if waves.is_empty() || !rising || waves[0] == 0 || waves.last() != Some(&100) {
                return Err(RolloutError::InvalidWaves);
            }
            // A wave that would hold no device (a tenth of one device is none) is left out,
            // so the default plan serves a fleet of one: of several boundaries that fall on
            // the same device, the last one stays.
            let end_of = |p: u8| (targets.len() * usize::from(p)).div_ceil(100);
            let kept: Vec<u8> = waves
                .iter()
                .enumerate()
                .filter(|(i, p)| {
                    waves
                        .get(i + 1)
                        .is_none_or(|next| end_of(*next) > end_of(**p))
                })
                .map(|(_, p)| *p)
                .collect();
            Ok((kept, Vec::new()))
        }
        Waves::Sizes(sizes) => {
            if sizes.is_empty() || sizes.len() > MAX_WAVES || sizes.contains(&0) {
                return Err(RolloutError::InvalidWaveSizes(targets.len()));
            }
            // Sizes past the targets are clamped: the waves fill up in order and those left
            // with no device are dropped; the targets the sizes leave over form a last wave.
            let mut left = targets.len();
            let mut clamped = Vec::with_capacity(sizes.len() + 1);
            for size in sizes {
                let size = size.min(left);
                if size == 0 {
                    break;
                }
                clamped.push(size);
                left -= size;
            }
            if left > 0 {
                if clamped.len() == MAX_WAVES {
                    return Err(RolloutError::InvalidWaveSizes(targets.len()));
                }
                clamped.push(left);
            }
            Ok((Vec::new(), clamped))
        }
    }
}

fn validate_reason(reason: &str) -> Result<(), RolloutError> {
    if crate::is_valid_reason(reason) {
        Ok(())
    } else {
        Err(RolloutError::InvalidReason)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use cqrs_es::test::TestFramework;

    use super::*;

    type Given = TestFramework<Rollout>;

    /// `n` seconds after the start of 2026.
    fn at(n: i64) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc()
            + TimeDelta::seconds(n)
    }

    fn device(n: usize) -> DeviceId {
        DeviceId::parse(format!("d{n}")).unwrap()
    }

    fn devices(range: std::ops::Range<usize>) -> Vec<DeviceId> {
        range.map(device).collect()
    }

    fn create(targets: Vec<DeviceId>, waves: Vec<u8>) -> RolloutCommand {
        create_in(targets, Waves::Percentages(waves))
    }

    fn create_in(targets: Vec<DeviceId>, waves: Waves) -> RolloutCommand {
        RolloutCommand::Create {
            rollout_id: RolloutId::parse("r1").unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            firmware_id: FirmwareId::parse("thermo@2.0.0").unwrap(),
            targets,
            waves,
            success_threshold: 50,
            error_threshold: 50,
            on_error: ErrorAction::Pause,
            device_timeout_secs: 600,
            window_secs: 3600,
            at: at(0),
        }
    }

    /// Ten devices in waves of 2, 3 and 5; success and error thresholds 50%.
    fn created_with(on_error: ErrorAction) -> RolloutEvent {
        RolloutEvent::RolloutCreated {
            rollout_id: RolloutId::parse("r1").unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            firmware_id: FirmwareId::parse("thermo@2.0.0").unwrap(),
            targets: devices(0..10),
            waves: vec![20, 50, 100],
            wave_sizes: Vec::new(),
            success_threshold: 50,
            error_threshold: 50,
            on_error,
            device_timeout_secs: 600,
            window_secs: 3600,
            at: at(0),
        }
    }

    fn created() -> RolloutEvent {
        created_with(ErrorAction::Pause)
    }

    fn started() -> Vec<RolloutEvent> {
        vec![
            created(),
            RolloutEvent::RolloutStarted { at: at(1) },
            RolloutEvent::WaveStarted {
                wave: 0,
                devices: devices(0..2),
                counts: None,
                at: at(1),
            },
        ]
    }

    fn sent(range: std::ops::Range<usize>) -> RolloutEvent {
        RolloutEvent::DevicesSent {
            devices: devices(range),
            at: at(2),
        }
    }

    /// Wave 0 running, both its devices sent.
    fn wave_0_sent() -> Vec<RolloutEvent> {
        with(started(), vec![sent(0..2)])
    }

    fn outcome(n: usize, outcome: DeviceOutcome) -> RolloutEvent {
        RolloutEvent::DeviceOutcomeRecorded {
            device_id: device(n),
            outcome,
            at: at(10),
        }
    }

    fn record(n: usize, outcome: DeviceOutcome) -> RolloutCommand {
        RolloutCommand::RecordDeviceOutcome {
            device_id: device(n),
            outcome,
            reported_at: None,
            at: at(10),
        }
    }

    fn failed() -> DeviceOutcome {
        DeviceOutcome::Failed {
            error: "flash write".into(),
        }
    }

    fn with(mut events: Vec<RolloutEvent>, more: Vec<RolloutEvent>) -> Vec<RolloutEvent> {
        events.extend(more);
        events
    }

    fn state(events: Vec<RolloutEvent>) -> Rollout {
        let mut rollout = Rollout::default();
        for event in events {
            rollout.evolve(event);
        }
        rollout
    }

    #[test]
    fn creates_a_valid_plan() {
        Given::with(())
            .given_no_previous_events()
            .when(create(devices(0..10), vec![20, 50, 100]))
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn refuses_bad_plans() {
        let cases = [
            (create(vec![], vec![100]), RolloutError::NoTargets),
            (
                create(vec![device(1), device(1)], vec![100]),
                RolloutError::DuplicateTarget(device(1)),
            ),
            (
                create(devices(0..4), vec![50, 40, 100]),
                RolloutError::InvalidWaves,
            ),
            (
                create(devices(0..4), vec![50, 90]),
                RolloutError::InvalidWaves,
            ),
            (
                create_in(devices(0..4), Waves::Sizes(vec![])),
                RolloutError::InvalidWaveSizes(4),
            ),
            (
                create_in(devices(0..4), Waves::Sizes(vec![1, 0, 3])),
                RolloutError::InvalidWaveSizes(4),
            ),
            (
                create_in(devices(0..200), Waves::Sizes(vec![1; MAX_WAVES + 1])),
                RolloutError::InvalidWaveSizes(200),
            ),
            (
                // A hundred waves given, and devices left for a hundred and first.
                create_in(devices(0..200), Waves::Sizes(vec![1; MAX_WAVES])),
                RolloutError::InvalidWaveSizes(200),
            ),
        ];
        for (command, error) in cases {
            Given::with(())
                .given_no_previous_events()
                .when(command)
                .then_expect_error(error);
        }
        let mut bad_threshold = create(devices(0..2), vec![100]);
        if let RolloutCommand::Create {
            success_threshold, ..
        } = &mut bad_threshold
        {
            *success_threshold = 0;
        }
        Given::with(())
            .given_no_previous_events()
            .when(bad_threshold)
            .then_expect_error(RolloutError::InvalidThreshold);
        let mut no_window = create(devices(0..2), vec![100]);
        if let RolloutCommand::Create { window_secs, .. } = &mut no_window {
            *window_secs = 0;
        }
        Given::with(())
            .given_no_previous_events()
            .when(no_window)
            .then_expect_error(RolloutError::InvalidTimeout);
        // The largest numbers a client can send are refused, one past each bound too.
        for (timeout, window) in [
            (u64::MAX, 3600),
            (600, u64::MAX),
            (MAX_DEVICE_TIMEOUT_SECS + 1, 3600),
            (600, MAX_WINDOW_SECS + 1),
            (0, 3600),
        ] {
            let mut out_of_range = create(devices(0..2), vec![100]);
            if let RolloutCommand::Create {
                device_timeout_secs,
                window_secs,
                ..
            } = &mut out_of_range
            {
                *device_timeout_secs = timeout;
                *window_secs = window;
            }
            Given::with(())
                .given_no_previous_events()
                .when(out_of_range)
                .then_expect_error(RolloutError::InvalidTimeout);
        }
        Given::with(())
            .given(vec![created()])
            .when(create(devices(0..10), vec![100]))
            .then_expect_error(RolloutError::AlreadyCreated);
    }

    #[test]
    fn start_launches_the_first_wave() {
        Given::with(())
            .given(vec![created()])
            .when(RolloutCommand::Start { at: at(1) })
            .then_expect_events(started()[1..].to_vec());
        Given::with(())
            .given(started())
            .when(RolloutCommand::Start { at: at(1) })
            .then_expect_error(RolloutError::InvalidTransition {
                from: RolloutStatus::Running,
                action: "start",
            });
    }

    #[test]
    fn sends_each_due_device_once() {
        // d5 belongs to wave 2, which has not started; d1 is named twice.
        Given::with(())
            .given(started())
            .when(RolloutCommand::SendToDevices {
                devices: vec![device(0), device(1), device(5), device(1)],
                at: at(2),
            })
            .then_expect_events(vec![sent(0..2)]);
        Given::with(())
            .given(wave_0_sent())
            .when(RolloutCommand::SendToDevices {
                devices: devices(0..2),
                at: at(3),
            })
            .then_expect_events(vec![]);
        Given::with(())
            .given(started())
            .when(RolloutCommand::SendToDevices {
                devices: vec![device(99)],
                at: at(2),
            })
            .then_expect_error(RolloutError::UnknownDevice(device(99)));
        let paused = RolloutEvent::RolloutPaused {
            reason: "weekend".into(),
            automatic: false,
            counts: None,
            at: at(2),
        };
        Given::with(())
            .given(with(started(), vec![paused]))
            .when(RolloutCommand::SendToDevices {
                devices: devices(0..2),
                at: at(3),
            })
            .then_expect_error(RolloutError::InvalidTransition {
                from: RolloutStatus::Paused,
                action: "send updates in",
            });
    }

    #[test]
    fn records_outcomes_of_sent_devices_once() {
        Given::with(())
            .given(started())
            .when(record(0, DeviceOutcome::Succeeded))
            .then_expect_error(RolloutError::NotSent(device(0)));
        // d0 alone is 50% of wave 0: the success threshold is reached, wave 1 starts.
        let mut after_d0 = state(wave_0_sent());
        after_d0.evolve(outcome(0, DeviceOutcome::Succeeded));
        Given::with(())
            .given(wave_0_sent())
            .when(record(0, DeviceOutcome::Succeeded))
            .then_expect_events(vec![
                outcome(0, DeviceOutcome::Succeeded),
                RolloutEvent::WaveStarted {
                    wave: 1,
                    devices: devices(2..5),
                    counts: Some(after_d0.counts(0)),
                    at: at(10),
                },
            ]);
        Given::with(())
            .given(with(
                wave_0_sent(),
                vec![outcome(0, DeviceOutcome::Succeeded)],
            ))
            .when(record(0, DeviceOutcome::Succeeded))
            .then_expect_events(vec![]);
        Given::with(())
            .given(started())
            .when(record(5, DeviceOutcome::Succeeded))
            .then_expect_error(RolloutError::WaveNotStarted(device(5)));
        Given::with(())
            .given(started())
            .when(record(99, DeviceOutcome::Succeeded))
            .then_expect_error(RolloutError::UnknownDevice(device(99)));
    }

    #[test]
    fn counts_say_what_justified_an_advance() {
        let mut rollout = state(wave_0_sent());
        rollout.evolve(outcome(0, DeviceOutcome::Succeeded));
        assert_eq!(
            rollout.counts(0),
            Counts {
                wave: 0,
                wave_size: 2,
                wave_succeeded: 1,
                wave_failed: 0,
                wave_timed_out: 0,
                wave_canceled: 0,
                targets: 10,
                sent: 2,
                succeeded: 1,
                failed: 0,
                timed_out: 0,
                canceled: 0,
                pending: 9,
            }
        );
    }

    #[test]
    fn timeouts_wait_for_their_time() {
        // Sent at 2 s with a 600 s timeout.
        let timed_out_at = |n: usize, secs: i64| RolloutCommand::RecordDeviceOutcome {
            device_id: device(n),
            outcome: DeviceOutcome::TimedOut,
            reported_at: None,
            at: at(secs),
        };
        Given::with(())
            .given(wave_0_sent())
            .when(timed_out_at(0, 601))
            .then_expect_error(RolloutError::NotTimedOut(device(0)));
        Given::with(())
            .given(wave_0_sent())
            .when(timed_out_at(0, 602))
            .then_expect_events(vec![RolloutEvent::DeviceOutcomeRecorded {
                device_id: device(0),
                outcome: DeviceOutcome::TimedOut,
                at: at(602),
            }]);
        // Never sent (offline): the window of 3600 s from the wave's start at 1 s.
        Given::with(())
            .given(started())
            .when(timed_out_at(1, 3600))
            .then_expect_error(RolloutError::NotTimedOut(device(1)));
        Given::with(())
            .given(started())
            .when(timed_out_at(1, 3601))
            .then_expect_events(vec![RolloutEvent::DeviceOutcomeRecorded {
                device_id: device(1),
                outcome: DeviceOutcome::TimedOut,
                at: at(3601),
            }]);
    }

    /// Rollouts stored before the bounds were checked may hold any timeout: their deadlines
    /// lie past the calendar and never come, instead of overflowing.
    #[test]
    fn timeouts_past_the_calendar_never_come() {
        let mut given = wave_0_sent();
        if let RolloutEvent::RolloutCreated {
            device_timeout_secs,
            window_secs,
            ..
        } = &mut given[0]
        {
            *device_timeout_secs = u64::MAX;
            *window_secs = u64::MAX;
        }
        for n in [0, 1] {
            let mut late = DateTime::<Utc>::MAX_UTC;
            if n == 1 {
                late = at(1 << 40);
            }
            Given::with(())
                .given(given.clone())
                .when(RolloutCommand::RecordDeviceOutcome {
                    device_id: device(n),
                    outcome: DeviceOutcome::TimedOut,
                    reported_at: None,
                    at: late,
                })
                .then_expect_error(RolloutError::NotTimedOut(device(n)));
        }
    }

    #[test]
    fn too_many_failures_pause_or_abort_as_configured() {
        // Wave 0 holds two devices; the error threshold is 50%: one failure is tolerated,
        // the second exceeds it.
        Given::with(())
            .given(wave_0_sent())
            .when(record(0, failed()))
            .then_expect_events(vec![outcome(0, failed())]);
        let mut both_failed = state(wave_0_sent());
        both_failed.evolve(outcome(0, failed()));
        both_failed.evolve(outcome(1, failed()));
        let reason =
            "error threshold exceeded: 2 of 2 devices in wave 0 failed or timed out (threshold 50%)";
        Given::with(())
            .given(with(wave_0_sent(), vec![outcome(0, failed())]))
            .when(record(1, failed()))
            .then_expect_events(vec![
                outcome(1, failed()),
                RolloutEvent::RolloutPaused {
                    reason: reason.into(),
                    automatic: true,
                    counts: Some(both_failed.counts(0)),
                    at: at(10),
                },
            ]);
        let aborting = vec![
            created_with(ErrorAction::Abort),
            started()[1].clone(),
            started()[2].clone(),
            sent(0..2),
            outcome(0, failed()),
        ];
        Given::with(())
            .given(aborting)
            .when(record(1, failed()))
            .then_expect_events(vec![
                outcome(1, failed()),
                RolloutEvent::RolloutAborted {
                    reason: reason.into(),
                    automatic: true,
                    canceled: 8,
                    counts: Some(both_failed.counts(0)),
                    at: at(10),
                },
            ]);
    }

    #[test]
    fn a_wave_finished_below_the_threshold_pauses_until_resumed() {
        // Success threshold 50% but error threshold 100%: two failures in wave 0 finish it
        // below the threshold without tripping the error action.
        let mut lenient = created();
        if let RolloutEvent::RolloutCreated {
            error_threshold, ..
        } = &mut lenient
        {
            *error_threshold = 100;
        }
        let given = vec![
            lenient,
            started()[1].clone(),
            started()[2].clone(),
            sent(0..2),
            outcome(0, failed()),
        ];
        let mut finished = state(given.clone());
        finished.evolve(outcome(1, failed()));
        let paused = RolloutEvent::RolloutPaused {
            reason: "wave 0 finished with 0% successes, below the 50% threshold".into(),
            automatic: true,
            counts: Some(finished.counts(0)),
            at: at(10),
        };
        Given::with(())
            .given(given.clone())
            .when(record(1, failed()))
            .then_expect_events(vec![outcome(1, failed()), paused.clone()]);
        // Resuming accepts the finished wave: the next one starts.
        Given::with(())
            .given(with(given, vec![outcome(1, failed()), paused]))
            .when(RolloutCommand::Resume { at: at(20) })
            .then_expect_events(vec![
                RolloutEvent::RolloutResumed { at: at(20) },
                RolloutEvent::WaveStarted {
                    wave: 1,
                    devices: devices(2..5),
                    counts: Some(finished.counts(0)),
                    at: at(20),
                },
            ]);
    }

    #[test]
    fn advances_by_hand_only_past_the_success_threshold() {
        Given::with(())
            .given(started())
            .when(RolloutCommand::AdvanceWave { at: at(5) })
            .then_expect_error(RolloutError::ThresholdNotReached {
                wave: 0,
                succeeded_percent: 0,
                threshold: 50,
            });
    }

    #[test]
    fn pause_resume_and_abort_follow_the_lifecycle() {
        let paused = RolloutEvent::RolloutPaused {
            reason: "weekend".into(),
            automatic: false,
            counts: Some(state(wave_0_sent()).counts(0)),
            at: at(5),
        };
        Given::with(())
            .given(wave_0_sent())
            .when(RolloutCommand::Pause {
                reason: "weekend".into(),
                at: at(5),
            })
            .then_expect_events(vec![paused.clone()]);
        Given::with(())
            .given(with(wave_0_sent(), vec![paused.clone()]))
            .when(RolloutCommand::AdvanceWave { at: at(6) })
            .then_expect_error(RolloutError::InvalidTransition {
                from: RolloutStatus::Paused,
                action: "advance",
            });
        Given::with(())
            .given(with(wave_0_sent(), vec![paused.clone()]))
            .when(RolloutCommand::Resume { at: at(6) })
            .then_expect_events(vec![RolloutEvent::RolloutResumed { at: at(6) }]);
        Given::with(())
            .given(wave_0_sent())
            .when(RolloutCommand::Resume { at: at(6) })
            .then_expect_error(RolloutError::InvalidTransition {
                from: RolloutStatus::Running,
                action: "resume",
            });
        // An outcome while paused is recorded; nothing is decided until the rollout resumes.
        Given::with(())
            .given(with(wave_0_sent(), vec![paused.clone()]))
            .when(record(0, DeviceOutcome::Succeeded))
            .then_expect_events(vec![outcome(0, DeviceOutcome::Succeeded)]);
        let aborted = RolloutEvent::RolloutAborted {
            reason: "bad build".into(),
            automatic: false,
            // Every device without an outcome: the two sent ones too.
            canceled: 10,
            counts: Some(state(wave_0_sent()).counts(0)),
            at: at(7),
        };
        Given::with(())
            .given(with(wave_0_sent(), vec![paused]))
            .when(RolloutCommand::Abort {
                reason: "bad build".into(),
                at: at(7),
            })
            .then_expect_events(vec![aborted.clone()]);
        Given::with(())
            .given(with(wave_0_sent(), vec![aborted.clone()]))
            .when(RolloutCommand::Resume { at: at(8) })
            .then_expect_error(RolloutError::InvalidTransition {
                from: RolloutStatus::Aborted,
                action: "resume",
            });
        // After an abort, what a sent device reported before it still counts; a later report
        // or a timeout does not: the device was told to give the update up.
        let reported_before_the_abort = RolloutCommand::RecordDeviceOutcome {
            device_id: device(0),
            outcome: failed(),
            reported_at: None,
            at: at(6),
        };
        Given::with(())
            .given(with(wave_0_sent(), vec![aborted.clone()]))
            .when(reported_before_the_abort)
            .then_expect_events(vec![RolloutEvent::DeviceOutcomeRecorded {
                device_id: device(0),
                outcome: failed(),
                at: at(6),
            }]);
        Given::with(())
            .given(with(wave_0_sent(), vec![aborted.clone()]))
            .when(record(0, failed()))
            .then_expect_error(RolloutError::Canceled(device(0)));
        Given::with(())
            .given(with(wave_0_sent(), vec![aborted.clone()]))
            .when(record(1, DeviceOutcome::TimedOut))
            .then_expect_error(RolloutError::Canceled(device(1)));
        Given::with(())
            .given(with(started(), vec![aborted]))
            .when(record(1, DeviceOutcome::TimedOut))
            .then_expect_error(RolloutError::Canceled(device(1)));
    }

    #[test]
    fn completes_when_every_device_has_its_outcome() {
        let one_wave = RolloutEvent::RolloutCreated {
            rollout_id: RolloutId::parse("r1").unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            firmware_id: FirmwareId::parse("thermo@2.0.0").unwrap(),
            targets: devices(0..2),
            waves: vec![100],
            wave_sizes: Vec::new(),
            success_threshold: 50,
            error_threshold: 100,
            on_error: ErrorAction::Pause,
            device_timeout_secs: 5,
            window_secs: 3600,
            at: at(0),
        };
        let running = vec![
            one_wave,
            RolloutEvent::RolloutStarted { at: at(1) },
            RolloutEvent::WaveStarted {
                wave: 0,
                devices: devices(0..2),
                counts: None,
                at: at(1),
            },
            sent(0..2),
            outcome(0, DeviceOutcome::Succeeded),
        ];
        Given::with(())
            .given(running.clone())
            .when(RolloutCommand::Complete { at: at(11) })
            .then_expect_error(RolloutError::OutcomesPending(1));
        let mut done = state(running.clone());
        done.evolve(outcome(1, DeviceOutcome::TimedOut));
        Given::with(())
            .given(running)
            .when(record(1, DeviceOutcome::TimedOut))
            .then_expect_events(vec![
                outcome(1, DeviceOutcome::TimedOut),
                RolloutEvent::RolloutCompleted {
                    succeeded: 1,
                    failed: 1,
                    counts: Some(done.counts(0)),
                    at: at(10),
                },
            ]);
    }

    #[test]
    fn waves_split_targets_by_cumulative_percent() {
        let rollout = state(vec![created()]);
        assert_eq!(rollout.wave_devices(0), devices(0..2).as_slice());
        assert_eq!(rollout.wave_devices(1), devices(2..5).as_slice());
        assert_eq!(rollout.wave_devices(2), devices(5..10).as_slice());
        assert_eq!(rollout.wave_of(&device(4)), Some(1));
        assert_eq!(rollout.wave_of(&device(10)), None);
    }

    #[test]
    fn waves_split_targets_by_size_with_the_rest_in_a_last_wave() {
        let created = |sizes: Vec<usize>| {
            let mut rollout = Rollout::default();
            let command = create_in(devices(0..10), Waves::Sizes(sizes));
            for event in rollout.decide(command).unwrap() {
                rollout.evolve(event);
            }
            rollout
        };
        let canary = created(vec![1, 4]);
        assert_eq!(canary.wave_sizes, [1, 4, 5]);
        assert!(canary.waves.is_empty());
        assert_eq!(canary.wave_count(), 3);
        assert_eq!(canary.wave_devices(0), devices(0..1).as_slice());
        assert_eq!(canary.wave_devices(1), devices(1..5).as_slice());
        assert_eq!(canary.wave_devices(2), devices(5..10).as_slice());
        assert_eq!(canary.wave_of(&device(4)), Some(1));
        assert_eq!(canary.tallies.len(), 3);
        // Sizes that cover every target add no wave.
        let exact = created(vec![3, 7]);
        assert_eq!(exact.wave_sizes, [3, 7]);
        assert_eq!(exact.wave_of(&device(9)), Some(1));
        // The event keeps the resolved sizes; a percentage plan's event has none.
        let event = canary_event();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json["RolloutCreated"]["wave_sizes"],
            serde_json::json!([1, 4, 5])
        );
        let json = serde_json::to_value(created_with(ErrorAction::Pause)).unwrap();
        assert!(json["RolloutCreated"].get("wave_sizes").is_none());
    }

    fn plan_of(targets: usize, waves: Waves) -> (Vec<u8>, Vec<usize>) {
        let rollout = state(
            Rollout::default()
                .decide(create_in(devices(0..targets), waves))
                .unwrap(),
        );
        let sizes = (0..rollout.wave_count())
            .map(|w| rollout.wave_devices(w).len())
            .collect();
        (rollout.waves, sizes)
    }

    #[test]
    fn small_fleets_get_the_waves_they_can_fill() {
        let default = || Waves::Percentages(vec![10, 50, 100]);
        // Waves that would hold no device are left out; the last boundary of those that fall
        // on the same device stays.
        assert_eq!(plan_of(1, default()), (vec![100], vec![1]));
        assert_eq!(plan_of(2, default()), (vec![50, 100], vec![1, 1]));
        assert_eq!(plan_of(3, default()), (vec![10, 50, 100], vec![1, 1, 1]));
        assert_eq!(plan_of(10, default()), (vec![10, 50, 100], vec![1, 4, 5]));
        let percent = |w: Vec<u8>| Waves::Percentages(w);
        assert_eq!(
            plan_of(4, percent(vec![10, 20, 100])),
            (vec![20, 100], vec![1, 3])
        );
        assert_eq!(
            plan_of(1, percent(vec![1, 2, 3, 100])),
            (vec![100], vec![1])
        );
        // Sizes past the targets are clamped in order.
        let sizes = |s: Vec<usize>| Waves::Sizes(s);
        assert_eq!(plan_of(3, sizes(vec![5, 50])), (vec![], vec![3]));
        assert_eq!(plan_of(3, sizes(vec![1, 5])), (vec![], vec![1, 2]));
        assert_eq!(plan_of(4, sizes(vec![2, 3])), (vec![], vec![2, 2]));
        assert_eq!(plan_of(4, sizes(vec![usize::MAX, 2])), (vec![], vec![4]));
        assert_eq!(plan_of(1, sizes(vec![1; MAX_WAVES])), (vec![], vec![1]));
        // A one-device rollout with the defaults runs to its end.
        let mut rollout = state(
            Rollout::default()
                .decide(create_in(devices(0..1), default()))
                .unwrap(),
        );
        for command in [
            RolloutCommand::Start { at: at(1) },
            RolloutCommand::SendToDevices {
                devices: devices(0..1),
                at: at(2),
            },
            record(0, DeviceOutcome::Succeeded),
        ] {
            for event in rollout.decide(command).unwrap() {
                rollout.evolve(event);
            }
        }
        assert_eq!(rollout.status, RolloutStatus::Completed);
    }

    fn canceled(reason: &str) -> DeviceOutcome {
        DeviceOutcome::Canceled {
            reason: reason.into(),
        }
    }

    #[test]
    fn canceled_devices_count_for_neither_threshold() {
        let gone = canceled("device decommissioned");
        // Canceled in a wave not started, and before the rollout started.
        Given::with(())
            .given(vec![created()])
            .when(record(7, gone.clone()))
            .then_expect_events(vec![outcome(7, gone.clone())]);
        Given::with(())
            .given(started())
            .when(record(7, gone.clone()))
            .then_expect_events(vec![outcome(7, gone.clone())]);
        // Wave 0 of two with one canceled: the other one's success is 100% of the wave.
        Given::with(())
            .given(wave_0_sent())
            .when(record(1, gone.clone()))
            .then_expect_events(vec![outcome(1, gone.clone())]);
        let mut judged = state(wave_0_sent());
        judged.evolve(outcome(1, gone.clone()));
        judged.evolve(outcome(0, DeviceOutcome::Succeeded));
        Given::with(())
            .given(with(wave_0_sent(), vec![outcome(1, gone.clone())]))
            .when(record(0, DeviceOutcome::Succeeded))
            .then_expect_events(vec![
                outcome(0, DeviceOutcome::Succeeded),
                RolloutEvent::WaveStarted {
                    wave: 1,
                    devices: devices(2..5),
                    counts: Some(judged.counts(0)),
                    at: at(10),
                },
            ]);
        assert_eq!(judged.counts(0).wave_canceled, 1);
        assert_eq!(judged.counts(0).pending, 8);
        // A wave whose every device was canceled leads on to the next.
        let events = state(with(wave_0_sent(), vec![outcome(0, gone.clone())]))
            .decide(record(1, gone.clone()))
            .unwrap();
        assert!(matches!(
            events[1],
            RolloutEvent::WaveStarted { wave: 1, .. }
        ));
        // A reason is required; a finished rollout cancels nothing.
        Given::with(())
            .given(wave_0_sent())
            .when(record(1, canceled("")))
            .then_expect_error(RolloutError::InvalidReason);
    }

    #[test]
    fn one_resume_accepts_the_wave() {
        // Every device of wave 0 must succeed, and no failure is tolerated.
        let strict = match created() {
            RolloutEvent::RolloutCreated {
                rollout_id,
                tenant,
                firmware_id,
                targets,
                waves,
                wave_sizes,
                on_error,
                device_timeout_secs,
                window_secs,
                at,
                ..
            } => RolloutEvent::RolloutCreated {
                rollout_id,
                tenant,
                firmware_id,
                targets,
                waves,
                wave_sizes,
                success_threshold: 100,
                error_threshold: 0,
                on_error,
                device_timeout_secs,
                window_secs,
                at,
            },
            _ => unreachable!(),
        };
        let mut rollout = state(with(vec![strict], started()[1..].to_vec()));
        rollout.evolve(sent(0..2));
        fn apply(rollout: &mut Rollout, command: RolloutCommand) -> Vec<RolloutEvent> {
            let events = rollout.decide(command).unwrap();
            for event in events.clone() {
                rollout.evolve(event);
            }
            events
        }
        // The first failure pauses at the error threshold, with d1 still installing.
        let events = apply(&mut rollout, record(0, failed()));
        assert!(matches!(
            events[1],
            RolloutEvent::RolloutPaused {
                automatic: true,
                ..
            }
        ));
        let events = apply(&mut rollout, RolloutCommand::Resume { at: at(11) });
        assert_eq!(events, vec![RolloutEvent::RolloutResumed { at: at(11) }]);
        // A failure after the resume, among the devices open then, is judged again: with no
        // failure tolerated, d1's pauses the rollout once more.
        let failing_again = rollout.clone();
        let events = failing_again.decide(record(1, failed())).unwrap();
        assert!(
            matches!(&events[1], RolloutEvent::RolloutPaused { reason, .. }
                if reason.contains("1 of 1 devices")),
            "{events:?}"
        );
        // d1 succeeds, ending the wave below the 100% success threshold: the resume accepted
        // the wave, so the next one starts instead of a second pause.
        let events = apply(&mut rollout, record(1, DeviceOutcome::Succeeded));
        assert!(
            matches!(events[1], RolloutEvent::WaveStarted { wave: 1, .. }),
            "{events:?}"
        );
        // The next wave is judged by the thresholds again.
        apply(
            &mut rollout,
            RolloutCommand::SendToDevices {
                devices: devices(2..5),
                at: at(12),
            },
        );
        let events = apply(&mut rollout, record(2, failed()));
        assert!(matches!(
            events[1],
            RolloutEvent::RolloutPaused {
                automatic: true,
                ..
            }
        ));
    }

    #[test]
    fn waves_whose_devices_were_all_canceled_are_passed_at_once() {
        let gone = canceled("device decommissioned");
        // Wave 0 (d0, d1) canceled before the start: starting goes on to wave 1.
        let before = with(
            vec![created()],
            vec![outcome(0, gone.clone()), outcome(1, gone.clone())],
        );
        let events = state(before)
            .decide(RolloutCommand::Start { at: at(1) })
            .unwrap();
        assert!(
            matches!(
                events.as_slice(),
                [
                    RolloutEvent::RolloutStarted { .. },
                    RolloutEvent::WaveStarted { wave: 0, .. },
                    RolloutEvent::WaveStarted { wave: 1, .. },
                ]
            ),
            "{events:?}"
        );
        // Every device canceled: the start completes the rollout.
        let all: Vec<RolloutEvent> = (0..10).map(|n| outcome(n, gone.clone())).collect();
        let events = state(with(vec![created()], all))
            .decide(RolloutCommand::Start { at: at(1) })
            .unwrap();
        assert!(
            matches!(
                events.last(),
                Some(RolloutEvent::RolloutCompleted {
                    succeeded: 0,
                    failed: 0,
                    ..
                })
            ),
            "{events:?}"
        );
        // Wave 1 canceled while wave 0 ran: wave 0's success starts wave 1, then wave 2.
        let mut running = wave_0_sent();
        for n in 2..5 {
            running.push(outcome(n, gone.clone()));
        }
        running.push(outcome(0, DeviceOutcome::Succeeded));
        let events = state(running)
            .decide(record(1, DeviceOutcome::Succeeded))
            .unwrap();
        assert!(
            matches!(
                events.as_slice(),
                [
                    RolloutEvent::DeviceOutcomeRecorded { .. },
                    RolloutEvent::WaveStarted { wave: 1, .. },
                    RolloutEvent::WaveStarted { wave: 2, .. },
                ]
            ),
            "{events:?}"
        );
    }

    #[test]
    fn a_cancel_that_shrinks_a_wave_judges_its_failures_again() {
        // Wave 0 of two, error threshold 50%: one failure is tolerated, until the other
        // device is canceled and the failure is all of the wave.
        let events = state(with(wave_0_sent(), vec![outcome(0, failed())]))
            .decide(record(1, canceled("device decommissioned")))
            .unwrap();
        assert!(
            matches!(
                &events[1],
                RolloutEvent::RolloutPaused {
                    automatic: true,
                    ..
                }
            ),
            "{events:?}"
        );
    }

    #[test]
    fn an_outcome_counts_from_when_the_device_reported_it() {
        let aborted = RolloutEvent::RolloutAborted {
            reason: "bad build".into(),
            automatic: false,
            canceled: 10,
            counts: None,
            at: at(7),
        };
        let late_record = RolloutCommand::RecordDeviceOutcome {
            device_id: device(0),
            outcome: DeviceOutcome::Succeeded,
            reported_at: Some(at(6)),
            at: at(30),
        };
        Given::with(())
            .given(with(wave_0_sent(), vec![aborted]))
            .when(late_record)
            .then_expect_events(vec![RolloutEvent::DeviceOutcomeRecorded {
                device_id: device(0),
                outcome: DeviceOutcome::Succeeded,
                at: at(30),
            }]);
    }

    #[test]
    fn a_busy_device_returns_to_the_queue() {
        let back = RolloutCommand::ReturnToQueue {
            device_id: device(0),
            reason: "another firmware update (thermo@1.9.0) is under way".into(),
            at: at(3),
        };
        let returned = RolloutEvent::DeviceReturnedToQueue {
            device_id: device(0),
            reason: "another firmware update (thermo@1.9.0) is under way".into(),
            at: at(3),
        };
        Given::with(())
            .given(wave_0_sent())
            .when(back.clone())
            .then_expect_events(vec![returned.clone()]);
        Given::with(())
            .given(started())
            .when(back)
            .then_expect_error(RolloutError::NotInFlight(device(0)));
        // Sent again later, once; it was neither a success nor a failure.
        let rollout = state(with(wave_0_sent(), vec![returned]));
        assert_eq!(rollout.counts(0).sent, 1);
        assert_eq!(
            rollout
                .decide(RolloutCommand::SendToDevices {
                    devices: devices(0..2),
                    at: at(4)
                })
                .unwrap(),
            vec![RolloutEvent::DevicesSent {
                devices: devices(0..1),
                at: at(4)
            }]
        );
    }

    fn canary_event() -> RolloutEvent {
        Rollout::default()
            .decide(create_in(devices(0..10), Waves::Sizes(vec![1, 4])))
            .unwrap()
            .remove(0)
    }

    #[test]
    fn a_snapshot_finds_waves_again() {
        let rollout = state(wave_0_sent());
        let restored: Rollout =
            serde_json::from_str(&serde_json::to_string(&rollout).unwrap()).unwrap();
        assert_eq!(restored, rollout);
        assert_eq!(restored.wave_of(&device(7)), Some(2));
        assert!(restored.is_due(&device(1)) && !restored.is_due(&device(2)));
    }
}
