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
//! The process manager that sends updates and watches timeouts lives in `fleetlog-process`.
//!
//! Here: the state, the outcomes and counts, the refusals, and the queries; `command.rs` holds
//! the commands and the decisions, `event.rs` the facts, `plan.rs` the checks of a wave plan,
//! as `device/` is laid out.

mod command;
mod event;
mod plan;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::firmware::FirmwareId;
use crate::ids::{DeviceId, RolloutId, TenantId};
use crate::limits::deadline;

pub use command::RolloutCommand;
pub use event::RolloutEvent;

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

    /// Devices sent the update that have no outcome yet: the ones an abort tells to give it up.
    pub fn in_flight(&self) -> impl Iterator<Item = &DeviceId> {
        self.sent.keys().filter(|d| !self.outcomes.contains_key(*d))
    }
}
