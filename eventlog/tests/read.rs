//! The reads of the event log against a real Postgres: order, horizons, filters and bounds.

use chrono::{DateTime, Duration, Utc};
use fleetlog_eventlog::{Cursor, HistoryQuery, Horizon};
use fleetlog_testkit::TestDatabase;
use serde_json::{json, Value};
use sqlx::{PgExecutor, PgPool};

/// Appends an event of `aggregate_type:aggregate_id` at the next sequence, as the store would.
async fn append(
    executor: impl PgExecutor<'_>,
    aggregate: (&str, &str),
    event_type: &str,
    payload: Value,
    recorded_at: DateTime<Utc>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, recorded_at)
         SELECT $1, $2, coalesce(max(sequence), 0) + 1, $3, '1.0', $4, '{\"tenant\":\"acme\"}', $5
           FROM events WHERE aggregate_type = $1 AND aggregate_id = $2
         RETURNING global_position",
    )
    .bind(aggregate.0)
    .bind(aggregate.1)
    .bind(event_type)
    .bind(payload)
    .bind(recorded_at)
    .fetch_one(executor)
    .await
    .expect("append an event")
}

async fn positions(pool: &PgPool, horizon: Horizon) -> Vec<i64> {
    fleetlog_eventlog::page_in_commit_order(pool, "device", Cursor::default(), horizon, 100)
        .await
        .expect("read a page")
        .into_iter()
        .map(|event| event.envelope.global_position)
        .collect()
}

#[tokio::test]
async fn a_page_in_commit_order_never_lets_an_event_appear_behind_it() {
    let db = TestDatabase::create().await;
    let now = Utc::now();
    // An older transaction takes position 1 and stays open while a younger one takes 2 and
    // commits.
    let mut older = db.pool.begin().await.unwrap();
    let first = append(
        &mut *older,
        ("device", "a"),
        "HeartbeatReceived",
        json!({}),
        now,
    )
    .await;
    let second = append(
        &db.pool,
        ("device", "b"),
        "HeartbeatReceived",
        json!({}),
        now,
    )
    .await;
    assert!(first < second);

    // Settled: the younger event is held back while the older transaction runs, since a
    // reader that moved past it could never see position 1 afterwards.
    assert_eq!(
        positions(&db.pool, Horizon::Settled).await,
        Vec::<i64>::new()
    );
    // Committed: what is committed, regardless.
    assert_eq!(positions(&db.pool, Horizon::Committed).await, vec![second]);

    older.commit().await.unwrap();
    assert_eq!(
        positions(&db.pool, Horizon::Settled).await,
        vec![first, second]
    );

    // After a cursor: only what follows it, and the aggregate type filter holds.
    let third = append(&db.pool, ("user", "u"), "UserCreated", json!({}), now).await;
    let page = fleetlog_eventlog::page_in_commit_order(
        &db.pool,
        "device",
        Cursor::default(),
        Horizon::Settled,
        1,
    )
    .await
    .unwrap();
    let after_first = page[0].cursor();
    let rest: Vec<i64> = fleetlog_eventlog::page_in_commit_order(
        &db.pool,
        "device",
        after_first,
        Horizon::Settled,
        100,
    )
    .await
    .unwrap()
    .iter()
    .map(|event| event.envelope.global_position)
    .collect();
    assert_eq!(rest, vec![second]);

    // The relay's page reads the same order, every type, and counts what lies after a cursor.
    let outgoing = fleetlog_eventlog::outgoing_page(&db.pool, Cursor::default(), 100)
        .await
        .unwrap();
    assert_eq!(outgoing.len(), 3);
    let order: Vec<i64> = outgoing
        .iter()
        .map(|event| event.cursor().global_position)
        .collect();
    assert_eq!(order, vec![first, second, third]);
    assert_eq!(outgoing[0].cursor(), after_first);
    let body: Value = serde_json::from_slice(&outgoing[0].body().unwrap()).unwrap();
    assert_eq!(body["aggregate_id"], "a");
    assert_eq!(body["metadata"]["tenant"], "acme");
    assert_eq!(
        fleetlog_eventlog::count_after(&db.pool, Cursor::default())
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        fleetlog_eventlog::count_after(&db.pool, outgoing[2].cursor())
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn a_history_pages_filters_and_stands_as_of_an_instant() {
    let db = TestDatabase::create().await;
    let start = Utc::now() - Duration::hours(1);
    for minute in 0..10 {
        let event_type = if minute % 2 == 0 {
            "TelemetryRecorded"
        } else {
            "StatusReported"
        };
        let at = start + Duration::minutes(minute);
        let payload = json!({ event_type: { "digest": format!("d{minute}") } });
        append(&db.pool, ("device", "dev-1"), event_type, payload, at).await;
    }
    let last = append(
        &db.pool,
        ("device", "dev-2"),
        "TelemetryRecorded",
        json!({}),
        start,
    )
    .await;

    let query = HistoryQuery {
        aggregate_type: "device",
        aggregate_id: "dev-1",
        after_sequence: 0,
        event_type: None,
        limit: 4,
    };
    let page = fleetlog_eventlog::history(&db.pool, query).await.unwrap();
    let sequences: Vec<i64> = page.iter().map(|event| event.sequence).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4]);
    let next = HistoryQuery {
        after_sequence: 8,
        ..query
    };
    let sequences: Vec<i64> = fleetlog_eventlog::history(&db.pool, next)
        .await
        .unwrap()
        .iter()
        .map(|event| event.sequence)
        .collect();
    assert_eq!(sequences, vec![9, 10]);
    let only_status = HistoryQuery {
        event_type: Some("StatusReported"),
        limit: 100,
        ..query
    };
    let only_status = fleetlog_eventlog::history(&db.pool, only_status)
        .await
        .unwrap();
    assert_eq!(only_status.len(), 5);
    assert!(only_status.iter().all(|e| e.event_type == "StatusReported"));
    let nobody = HistoryQuery {
        aggregate_id: "",
        ..query
    };
    assert!(fleetlog_eventlog::history(&db.pool, nobody)
        .await
        .unwrap()
        .is_empty());

    // As of minute 3, inclusive: four events; the count stops at its cap.
    let at = start + Duration::minutes(3);
    let until = fleetlog_eventlog::until(&db.pool, "device", "dev-1", at, 0, 100)
        .await
        .unwrap();
    assert_eq!(until.len(), 4);
    let after_two = fleetlog_eventlog::until(&db.pool, "device", "dev-1", at, 2, 1)
        .await
        .unwrap();
    assert_eq!(after_two[0].sequence, 3);
    assert_eq!(after_two.len(), 1);
    let count = |cap| fleetlog_eventlog::count_until(&db.pool, "device", "dev-1", at, cap);
    assert_eq!(count(100).await.unwrap(), 4);
    assert_eq!(count(2).await.unwrap(), 2);
    let before_everything = DateTime::<Utc>::UNIX_EPOCH;
    assert_eq!(
        fleetlog_eventlog::count_until(&db.pool, "device", "dev-1", before_everything, 100)
            .await
            .unwrap(),
        0
    );

    // By position, and nothing for a position no event holds.
    let third = &until[2];
    let found = fleetlog_eventlog::at_position(&db.pool, third.global_position)
        .await
        .unwrap();
    assert_eq!(found.as_ref(), Some(third));
    for missing in [0, -1, i64::MAX] {
        assert_eq!(
            fleetlog_eventlog::at_position(&db.pool, missing)
                .await
                .unwrap(),
            None
        );
    }

    // Counts.
    assert_eq!(
        fleetlog_eventlog::count_of_type(&db.pool, "device")
            .await
            .unwrap(),
        11
    );
    let summary = fleetlog_eventlog::summary(&db.pool).await.unwrap();
    assert_eq!(summary.events, 11);
    assert_eq!(summary.aggregates, 2);
    assert_eq!(summary.last_position, last);
    assert_eq!(
        summary.by_type,
        vec![
            ("device".to_string(), "StatusReported".to_string(), 5),
            ("device".to_string(), "TelemetryRecorded".to_string(), 6),
        ]
    );
}

#[tokio::test]
async fn recent_digests_look_back_only_as_far_as_asked() {
    let db = TestDatabase::create().await;
    let now = Utc::now();
    for n in 0..6 {
        let payload = json!({ "TelemetryRecorded": { "digest": format!("d{n}") } });
        append(
            &db.pool,
            ("device", "dev-1"),
            "TelemetryRecorded",
            payload,
            now,
        )
        .await;
    }
    // Another device's digest and another type's field of that name are not its reports.
    let elsewhere = json!({ "TelemetryRecorded": { "digest": "d5-elsewhere" } });
    append(
        &db.pool,
        ("device", "dev-2"),
        "TelemetryRecorded",
        elsewhere,
        now,
    )
    .await;
    let other_type = json!({ "CommandIssued": { "digest": "d-command" } });
    append(
        &db.pool,
        ("device", "dev-1"),
        "CommandIssued",
        other_type,
        now,
    )
    .await;

    let wanted: Vec<String> = ["d0", "d4", "d5", "d5-elsewhere", "d-command", ""]
        .iter()
        .map(|digest| digest.to_string())
        .collect();
    let types = ["TelemetryRecorded", "StatusReported", "HeartbeatReceived"];
    let mut found = fleetlog_eventlog::recent_digests(&db.pool, "dev-1", &types, &wanted, 3)
        .await
        .unwrap();
    found.sort();
    // The last three events are d4, d5 and the command: d0 lies further back.
    assert_eq!(found, vec!["d4".to_string(), "d5".to_string()]);
    let mut everything = fleetlog_eventlog::recent_digests(&db.pool, "dev-1", &types, &wanted, 100)
        .await
        .unwrap();
    everything.sort();
    assert_eq!(everything, vec!["d0", "d4", "d5"]);
    assert!(
        fleetlog_eventlog::recent_digests(&db.pool, "dev-1", &types, &[], 100)
            .await
            .unwrap()
            .is_empty()
    );
}
