//! Commands to the Rollout aggregate and the decisions they lead to.

use super::plan::{validate_plan, validate_reason};
use super::*;

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

impl Rollout {
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
