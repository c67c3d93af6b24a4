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
