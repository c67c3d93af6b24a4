//! The read models' document functions (`fleetlog_merge`, `fleetlog_merge_each`,
//! `fleetlog_delta`) against the domain's rules, on a real Postgres: a device's desired,
//! reported and delta are the same whether the aggregate, the live worker, a batch or a past
//! view computes them.

use fleetlog_domain::device::{compose_patches, document_delta, merge_properties};
use fleetlog_testkit::TestDatabase;
use serde_json::{json, Map, Value};

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// A document and patches applied to it one after the other.
fn cases() -> Vec<(Value, Vec<Value>)> {
    vec![
        // The sequence: a nested null deletes one key and keeps its sibling.
        (
            json!({"cfg": {"a": 1, "b": 2}}),
            vec![json!({"cfg": {"a": null}})],
        ),
        // Deep nesting, arrays replaced whole, nulls inside a new object dropped.
        (
            json!({"a": {"b": {"c": {"d": 1, "e": [1, 2]}}}}),
            vec![json!({"a": {"b": {"c": {"d": null, "e": [3]}, "f": {"g": null, "h": 1}}}})],
        ),
        // An object over a value, a value over an object, a removed object set again.
        (
            json!({"x": 1, "y": {"z": 1}, "w": {"v": 1}}),
            vec![
                json!({"x": {"n": 1}, "y": 2}),
                json!({"w": null}),
                json!({"w": {"u": 2}}),
            ],
        ),
        // Patches that compose into one, and one that cannot follow the one before.
        (
            json!({"k": {"old": true}}),
            vec![
                json!({"k": {"a": 1}}),
                json!({"k": {"b": {"c": 2}}}),
                json!({"k": 5}),
                json!({"k": {"fresh": 1}}),
            ],
        ),
        (json!({}), vec![json!({"only": null})]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_compose_and_deltas_agree_with_the_domain() {
    let db = TestDatabase::create().await;
    for (start, patches) in cases() {
        // One by one, in Rust.
        let mut expected = object(start.clone());
        for patch in &patches {
            merge_properties(&mut expected, &object(patch.clone()));
        }
        // One by one, in SQL.
        let mut sql: Value = start.clone();
        for patch in &patches {
            sql = sqlx::query_scalar("SELECT fleetlog_merge($1, $2)")
                .bind(&sql)
                .bind(patch)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        }
        assert_eq!(sql, Value::Object(expected.clone()), "{start} {patches:?}");
        // Folded as a worker's batch folds them: composed where one patch says both.
        let mut folded: Vec<Map<String, Value>> = Vec::new();
        for patch in &patches {
            let patch = object(patch.clone());
            if !folded
                .last_mut()
                .is_some_and(|last| compose_patches(last, &patch))
            {
                folded.push(patch);
            }
        }
        let folded = Value::Array(folded.into_iter().map(Value::Object).collect());
        let batch: Value = sqlx::query_scalar("SELECT fleetlog_merge_each($1, $2)")
            .bind(&start)
            .bind(&folded)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(batch, Value::Object(expected), "folded {folded}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_hold_only_differing_leaves_and_compare_numbers_by_value() {
    let db = TestDatabase::create().await;
    let cases = [
        (
            json!({"cfg": {"a": 1, "b": 2}}),
            json!({"cfg": {"a": 1.0, "b": 3}}),
            json!({"cfg": {"b": 2}}),
        ),
        (json!({"t": 21}), json!({"t": 21.0}), json!({})),
        (json!({"t": 1e2}), json!({"t": 100}), json!({})),
        (json!({"l": [1, 2]}), json!({"l": [1.0, 2.0]}), json!({})),
        (
            json!({"l": [1, 2]}),
            json!({"l": [2, 1]}),
            json!({"l": [1, 2]}),
        ),
        (
            json!({"o": {"p": {"q": 1}}}),
            json!({"o": 5}),
            json!({"o": {"p": {"q": 1}}}),
        ),
        (json!({"o": {}}), json!({}), json!({})),
        (json!({"s": "on"}), json!({}), json!({"s": "on"})),
        (
            json!({"n": -1}),
            json!({"n": 18_446_744_073_709_551_615_u64}),
            json!({"n": -1}),
        ),
        // The nearest double to an integer past 2^53 is not that integer.
        (
            json!({"n": 9_007_199_254_740_993_u64}),
            json!({"n": 9_007_199_254_740_992.0}),
            json!({"n": 9_007_199_254_740_993_u64}),
        ),
    ];
    for (desired, reported, expected) in cases {
        let rust = document_delta(&object(desired.clone()), &object(reported.clone()));
        assert_eq!(Value::Object(rust), expected, "{desired} over {reported}");
        let sql: Value = sqlx::query_scalar("SELECT fleetlog_delta($1, $2)")
            .bind(&desired)
            .bind(&reported)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(sql, expected, "SQL: {desired} over {reported}");
    }
}
