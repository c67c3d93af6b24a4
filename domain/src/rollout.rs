//! The Rollout aggregate: installing one firmware image on a set of devices, wave by wave.
//!
//! A rollout is created with its targets split into waves (cumulative percentages, e.g.
//! `[5, 25, 100]`), a success threshold a wave must reach before the next one starts, and an error
//! threshold that pauses the rollout by itself when too many devices of a wave fail. Outcomes per
//! device are recorded here; the process manager that sends updates and watches timeouts lives in
//! `projections`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::firmware::FirmwareId;
use crate::ids::{DeviceId, RolloutId, TenantId};

/// The most devices one rollout may target; larger fleets are rolled out in several rollouts.
pub const MAX_TARGETS: usize = 100_000;

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
    /// Stopped by hand or by the error threshold; may resume.
    Paused,
    /// Every wave done.
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

/// How the update ended on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceOutcome {
    /// The device runs the new firmware.
    Succeeded,
    /// The device reported a failure.
    Failed {
        /// What it reported.
        error: String,
    },
    /// The device did not finish within the per-device timeout.
    TimedOut,
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
    /// Cumulative wave boundaries in percent, the last one 100.
    pub waves: Vec<u8>,
    /// Percent of a wave that must succeed before the next wave.
    pub success_threshold: u8,
    /// Percent of a wave that may fail before the rollout pauses itself.
    pub error_threshold: u8,
    /// Seconds a device has to finish its update.
    pub device_timeout_secs: u64,
    /// Created, running, paused, completed or aborted.
    pub status: RolloutStatus,
    /// The latest wave started, if any.
    pub current_wave: Option<usize>,
    /// Outcome per device that finished.
    pub outcomes: BTreeMap<DeviceId, DeviceOutcome>,
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
        /// Cumulative wave boundaries in percent, strictly rising, the last one 100.
        waves: Vec<u8>,
        /// Percent of a wave that must succeed before the next one, 1 to 100.
        success_threshold: u8,
        /// Percent of a wave that may fail before the rollout pauses, 0 to 100.
        error_threshold: u8,
        /// Seconds a device has to finish, at least 1.
        device_timeout_secs: u64,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Start the first wave.
    Start {
        /// Now.
        at: DateTime<Utc>,
    },
    /// Record how the update ended on one device.
    RecordDeviceOutcome {
        /// The device.
        device_id: DeviceId,
        /// How it ended.
        outcome: DeviceOutcome,
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
    /// Continue after a pause.
    Resume {
        /// Now.
        at: DateTime<Utc>,
    },
    /// Stop for good.
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
        /// Cumulative wave boundaries in percent.
        waves: Vec<u8>,
        /// Success threshold in percent.
        success_threshold: u8,
        /// Error threshold in percent.
        error_threshold: u8,
        /// Per-device timeout in seconds.
        device_timeout_secs: u64,
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
        /// Whether the error threshold paused it, rather than a person.
        automatic: bool,
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
        /// When.
        at: DateTime<Utc>,
    },
    /// Every wave is done.
    RolloutCompleted {
        /// Devices that succeeded.
        succeeded: usize,
        /// Devices that failed or timed out.
        failed: usize,
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
    /// A wave with no device in it.
    #[error("wave {0} would hold no device: use fewer waves for this many targets")]
    EmptyWave(usize),
    /// A threshold out of range.
    #[error("success threshold must be 1 to 100 and error threshold 0 to 100")]
    InvalidThreshold,
    /// A zero per-device timeout.
    #[error("the per-device timeout must be at least one second")]
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

/// The index range of `targets` that wave `wave` covers.
fn wave_range(target_count: usize, waves: &[u8], wave: usize) -> std::ops::Range<usize> {
    let end_of = |i: usize| (target_count * usize::from(waves[i])).div_ceil(100);
    let start = if wave == 0 { 0 } else { end_of(wave - 1) };
    start..end_of(wave)
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
                success_threshold,
                error_threshold,
                device_timeout_secs,
                ..
            } => {
                self.id = Some(rollout_id);
                self.tenant = Some(tenant);
                self.firmware_id = Some(firmware_id);
                self.targets = targets;
                self.waves = waves;
                self.success_threshold = success_threshold;
                self.error_threshold = error_threshold;
                self.device_timeout_secs = device_timeout_secs;
                self.status = RolloutStatus::Created;
            }
            RolloutEvent::RolloutStarted { .. } | RolloutEvent::RolloutResumed { .. } => {
                self.status = RolloutStatus::Running;
            }
            RolloutEvent::WaveStarted { wave, .. } => self.current_wave = Some(wave),
            RolloutEvent::DeviceOutcomeRecorded {
                device_id, outcome, ..
            } => {
                self.outcomes.insert(device_id, outcome);
            }
            RolloutEvent::RolloutPaused { .. } => self.status = RolloutStatus::Paused,
            RolloutEvent::RolloutAborted { .. } => self.status = RolloutStatus::Aborted,
            RolloutEvent::RolloutCompleted { .. } => self.status = RolloutStatus::Completed,
        }
    }

    /// The devices of wave `wave`, in order.
    pub fn wave_devices(&self, wave: usize) -> &[DeviceId] {
        &self.targets[wave_range(self.targets.len(), &self.waves, wave)]
    }

    /// The index of the wave that holds `device`.
    pub fn wave_of(&self, device: &DeviceId) -> Option<usize> {
        let index = self.targets.iter().position(|d| d == device)?;
        (0..self.waves.len())
            .find(|w| wave_range(self.targets.len(), &self.waves, *w).contains(&index))
    }

    /// Succeeded and failed (incl. timed-out) devices of a wave.
    fn wave_tally(&self, wave: usize) -> (usize, usize) {
        self.wave_devices(wave)
            .iter()
            .filter_map(|d| self.outcomes.get(d))
            .fold((0, 0), |(ok, failed), outcome| match outcome {
                DeviceOutcome::Succeeded => (ok + 1, failed),
                _ => (ok, failed + 1),
            })
    }

    fn ensure_wave_succeeded(&self, wave: usize) -> Result<(), RolloutError> {
        let size = self.wave_devices(wave).len();
        let (succeeded, _) = self.wave_tally(wave);
        if succeeded * 100 < usize::from(self.success_threshold) * size {
            return Err(RolloutError::ThresholdNotReached {
                wave,
                succeeded_percent: u8::try_from(succeeded * 100 / size).unwrap_or(100),
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

    /// Decides which events a command produces, without changing the aggregate.
    pub fn decide(&self, command: RolloutCommand) -> Result<Vec<RolloutEvent>, RolloutError> {
        match command {
            RolloutCommand::Create {
                rollout_id,
                tenant,
                firmware_id,
                targets,
                waves,
                success_threshold,
                error_threshold,
                device_timeout_secs,
                at,
            } => {
                if self.status != RolloutStatus::Unplanned {
                    return Err(RolloutError::AlreadyCreated);
                }
                validate_plan(&targets, &waves)?;
                if !(1..=100).contains(&success_threshold) || error_threshold > 100 {
                    return Err(RolloutError::InvalidThreshold);
                }
                if device_timeout_secs == 0 {
                    return Err(RolloutError::InvalidTimeout);
                }
                Ok(vec![RolloutEvent::RolloutCreated {
                    rollout_id,
                    tenant,
                    firmware_id,
                    targets,
                    waves,
                    success_threshold,
                    error_threshold,
                    device_timeout_secs,
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
                        at,
                    },
                ])
            }
            RolloutCommand::RecordDeviceOutcome {
                device_id,
                outcome,
                at,
            } => self.record_outcome(device_id, outcome, at),
            RolloutCommand::AdvanceWave { at } => {
                if self.status != RolloutStatus::Running {
                    return Err(self.transition("advance"));
                }
                let current = self.current_wave.unwrap_or(0);
                let next = current + 1;
                if next >= self.waves.len() {
                    return Err(RolloutError::NoMoreWaves);
                }
                self.ensure_wave_succeeded(current)?;
                Ok(vec![RolloutEvent::WaveStarted {
                    wave: next,
                    devices: self.wave_devices(next).to_vec(),
                    at,
                }])
            }
            RolloutCommand::Pause { reason, at } => {
                validate_reason(&reason)?;
                if self.status != RolloutStatus::Running {
                    return Err(self.transition("pause"));
                }
                Ok(vec![RolloutEvent::RolloutPaused {
                    reason,
                    automatic: false,
                    at,
                }])
            }
            RolloutCommand::Resume { at } => {
                if self.status != RolloutStatus::Paused {
                    return Err(self.transition("resume"));
                }
                Ok(vec![RolloutEvent::RolloutResumed { at }])
            }
            RolloutCommand::Abort { reason, at } => {
                validate_reason(&reason)?;
                match self.status {
                    RolloutStatus::Created | RolloutStatus::Running | RolloutStatus::Paused => {
                        Ok(vec![RolloutEvent::RolloutAborted { reason, at }])
                    }
                    _ => Err(self.transition("abort")),
                }
            }
            RolloutCommand::Complete { at } => {
                if self.status != RolloutStatus::Running {
                    return Err(self.transition("complete"));
                }
                let last = self.waves.len() - 1;
                if self.current_wave != Some(last) {
                    return Err(RolloutError::OutcomesPending(
                        self.targets.len() - self.outcomes.len(),
                    ));
                }
                let pending = self.targets.len() - self.outcomes.len();
                if pending > 0 {
                    return Err(RolloutError::OutcomesPending(pending));
                }
                self.ensure_wave_succeeded(last)?;
                let succeeded = self
                    .outcomes
                    .values()
                    .filter(|o| **o == DeviceOutcome::Succeeded)
                    .count();
                Ok(vec![RolloutEvent::RolloutCompleted {
                    succeeded,
                    failed: self.outcomes.len() - succeeded,
                    at,
                }])
            }
        }
    }

    fn record_outcome(
        &self,
        device_id: DeviceId,
        outcome: DeviceOutcome,
        at: DateTime<Utc>,
    ) -> Result<Vec<RolloutEvent>, RolloutError> {
        if !matches!(self.status, RolloutStatus::Running | RolloutStatus::Paused) {
            return Err(self.transition("record an outcome in"));
        }
        let wave = self
            .wave_of(&device_id)
            .ok_or_else(|| RolloutError::UnknownDevice(device_id.clone()))?;
        if self.current_wave.is_none_or(|current| wave > current) {
            return Err(RolloutError::WaveNotStarted(device_id));
        }
        if self.outcomes.contains_key(&device_id) {
            // A device's outcome is final; a repeated report changes nothing.
            return Ok(vec![]);
        }
        let mut events = vec![RolloutEvent::DeviceOutcomeRecorded {
            device_id,
            outcome: outcome.clone(),
            at,
        }];
        if self.status == RolloutStatus::Running && outcome != DeviceOutcome::Succeeded {
            let (_, failed) = self.wave_tally(wave);
            let size = self.wave_devices(wave).len();
            if (failed + 1) * 100 > usize::from(self.error_threshold) * size {
                events.push(RolloutEvent::RolloutPaused {
                    reason: format!(
                        "error threshold exceeded: {} of {} devices in wave {} failed (threshold {}%)",
                        failed + 1,
                        size,
                        wave,
                        self.error_threshold
                    ),
                    automatic: true,
                    at,
                });
            }
        }
        Ok(events)
    }
}

fn validate_plan(targets: &[DeviceId], waves: &[u8]) -> Result<(), RolloutError> {
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
    let rising = waves.windows(2).all(|w| w[0] < w[1]);
    if waves.is_empty() || !rising || waves[0] == 0 || waves.last() != Some(&100) {
        return Err(RolloutError::InvalidWaves);
    }
    match (0..waves.len()).find(|w| wave_range(targets.len(), waves, *w).is_empty()) {
        Some(empty) => Err(RolloutError::EmptyWave(empty)),
        None => Ok(()),
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
    use cqrs_es::test::TestFramework;

    use super::*;

    type Given = TestFramework<Rollout>;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .into()
    }

    fn device(n: usize) -> DeviceId {
        DeviceId::parse(format!("d{n}")).unwrap()
    }

    fn devices(range: std::ops::Range<usize>) -> Vec<DeviceId> {
        range.map(device).collect()
    }

    fn create(targets: Vec<DeviceId>, waves: Vec<u8>) -> RolloutCommand {
        RolloutCommand::Create {
            rollout_id: RolloutId::parse("r1").unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            firmware_id: FirmwareId::parse("thermo@2.0.0").unwrap(),
            targets,
            waves,
            success_threshold: 50,
            error_threshold: 50,
            device_timeout_secs: 600,
            at: at(),
        }
    }

    /// Ten devices in waves of 2, 3 and 5.
    fn created() -> RolloutEvent {
        RolloutEvent::RolloutCreated {
            rollout_id: RolloutId::parse("r1").unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            firmware_id: FirmwareId::parse("thermo@2.0.0").unwrap(),
            targets: devices(0..10),
            waves: vec![20, 50, 100],
            success_threshold: 50,
            error_threshold: 50,
            device_timeout_secs: 600,
            at: at(),
        }
    }

    fn started() -> Vec<RolloutEvent> {
        vec![
            created(),
            RolloutEvent::RolloutStarted { at: at() },
            RolloutEvent::WaveStarted {
                wave: 0,
                devices: devices(0..2),
                at: at(),
            },
        ]
    }

    fn outcome(n: usize, outcome: DeviceOutcome) -> RolloutEvent {
        RolloutEvent::DeviceOutcomeRecorded {
            device_id: device(n),
            outcome,
            at: at(),
        }
    }

    fn record(n: usize, outcome: DeviceOutcome) -> RolloutCommand {
        RolloutCommand::RecordDeviceOutcome {
            device_id: device(n),
            outcome,
            at: at(),
        }
    }

    fn with(mut events: Vec<RolloutEvent>, more: Vec<RolloutEvent>) -> Vec<RolloutEvent> {
        events.extend(more);
        events
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
                create(devices(0..2), vec![10, 20, 100]),
                RolloutError::EmptyWave(1),
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
        Given::with(())
            .given(vec![created()])
            .when(create(devices(0..10), vec![100]))
            .then_expect_error(RolloutError::AlreadyCreated);
    }

    #[test]
    fn start_launches_the_first_wave() {
        Given::with(())
            .given(vec![created()])
            .when(RolloutCommand::Start { at: at() })
            .then_expect_events(started()[1..].to_vec());
        Given::with(())
            .given(started())
            .when(RolloutCommand::Start { at: at() })
            .then_expect_error(RolloutError::InvalidTransition {
                from: RolloutStatus::Running,
                action: "start",
            });
    }

    #[test]
    fn records_outcomes_of_started_waves_once() {
        Given::with(())
            .given(started())
            .when(record(0, DeviceOutcome::Succeeded))
            .then_expect_events(vec![outcome(0, DeviceOutcome::Succeeded)]);
        Given::with(())
            .given(with(started(), vec![outcome(0, DeviceOutcome::Succeeded)]))
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
    fn too_many_failures_pause_the_rollout() {
        // Wave 0 holds two devices; the error threshold is 50%: one failure is tolerated,
        // the second exceeds it.
        let failed = || DeviceOutcome::Failed {
            error: "flash write".into(),
        };
        Given::with(())
            .given(started())
            .when(record(0, failed()))
            .then_expect_events(vec![outcome(0, failed())]);
        Given::with(())
            .given(with(started(), vec![outcome(0, failed())]))
            .when(record(1, DeviceOutcome::TimedOut))
            .then_expect_events(vec![
                outcome(1, DeviceOutcome::TimedOut),
                RolloutEvent::RolloutPaused {
                    reason:
                        "error threshold exceeded: 2 of 2 devices in wave 0 failed (threshold 50%)"
                            .into(),
                    automatic: true,
                    at: at(),
                },
            ]);
    }

    #[test]
    fn advances_only_past_the_success_threshold() {
        Given::with(())
            .given(started())
            .when(RolloutCommand::AdvanceWave { at: at() })
            .then_expect_error(RolloutError::ThresholdNotReached {
                wave: 0,
                succeeded_percent: 0,
                threshold: 50,
            });
        Given::with(())
            .given(with(started(), vec![outcome(0, DeviceOutcome::Succeeded)]))
            .when(RolloutCommand::AdvanceWave { at: at() })
            .then_expect_events(vec![RolloutEvent::WaveStarted {
                wave: 1,
                devices: devices(2..5),
                at: at(),
            }]);
    }

    #[test]
    fn pause_resume_and_abort_follow_the_lifecycle() {
        let paused = RolloutEvent::RolloutPaused {
            reason: "weekend".into(),
            automatic: false,
            at: at(),
        };
        Given::with(())
            .given(started())
            .when(RolloutCommand::Pause {
                reason: "weekend".into(),
                at: at(),
            })
            .then_expect_events(vec![paused.clone()]);
        Given::with(())
            .given(with(started(), vec![paused.clone()]))
            .when(RolloutCommand::AdvanceWave { at: at() })
            .then_expect_error(RolloutError::InvalidTransition {
                from: RolloutStatus::Paused,
                action: "advance",
            });
        Given::with(())
            .given(with(started(), vec![paused.clone()]))
            .when(RolloutCommand::Resume { at: at() })
            .then_expect_events(vec![RolloutEvent::RolloutResumed { at: at() }]);
        Given::with(())
            .given(started())
            .when(RolloutCommand::Resume { at: at() })
            .then_expect_error(RolloutError::InvalidTransition {
                from: RolloutStatus::Running,
                action: "resume",
            });
        let aborted = RolloutEvent::RolloutAborted {
            reason: "bad build".into(),
            at: at(),
        };
        Given::with(())
            .given(with(started(), vec![paused]))
            .when(RolloutCommand::Abort {
                reason: "bad build".into(),
                at: at(),
            })
            .then_expect_events(vec![aborted.clone()]);
        Given::with(())
            .given(with(started(), vec![aborted]))
            .when(RolloutCommand::Resume { at: at() })
            .then_expect_error(RolloutError::InvalidTransition {
                from: RolloutStatus::Aborted,
                action: "resume",
            });
    }

    #[test]
    fn completes_when_the_last_wave_is_done() {
        let one_wave = RolloutEvent::RolloutCreated {
            rollout_id: RolloutId::parse("r1").unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            firmware_id: FirmwareId::parse("thermo@2.0.0").unwrap(),
            targets: devices(0..2),
            waves: vec![100],
            success_threshold: 50,
            error_threshold: 100,
            device_timeout_secs: 600,
            at: at(),
        };
        let running = vec![
            one_wave,
            RolloutEvent::RolloutStarted { at: at() },
            RolloutEvent::WaveStarted {
                wave: 0,
                devices: devices(0..2),
                at: at(),
            },
            outcome(0, DeviceOutcome::Succeeded),
        ];
        Given::with(())
            .given(running.clone())
            .when(RolloutCommand::Complete { at: at() })
            .then_expect_error(RolloutError::OutcomesPending(1));
        Given::with(())
            .given(with(running, vec![outcome(1, DeviceOutcome::TimedOut)]))
            .when(RolloutCommand::Complete { at: at() })
            .then_expect_events(vec![RolloutEvent::RolloutCompleted {
                succeeded: 1,
                failed: 1,
                at: at(),
            }]);
        Given::with(())
            .given(started())
            .when(RolloutCommand::Complete { at: at() })
            .then_expect_error(RolloutError::OutcomesPending(10));
    }

    #[test]
    fn waves_split_targets_by_cumulative_percent() {
        let mut rollout = Rollout::default();
        rollout.evolve(created());
        assert_eq!(rollout.wave_devices(0), devices(0..2).as_slice());
        assert_eq!(rollout.wave_devices(1), devices(2..5).as_slice());
        assert_eq!(rollout.wave_devices(2), devices(5..10).as_slice());
        assert_eq!(rollout.wave_of(&device(4)), Some(1));
    }
}
