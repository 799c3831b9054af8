//! The API as documented: `/openapi.json` tells the truth, and no input gets a 500.

mod common;

use common::*;
use proptest::prelude::*;
use serde_json::{Value, json};

fn sample_path(template: &str) -> String {
    template
        .replace("{event_type}", "agent.created")
        .replace("{subject}", "agent.created")
        .replace("{version}", "1")
        .replace("{group}", "no-such-agent")
        .replace("{name}", "demo")
}

#[tokio::test]
async fn every_documented_operation_is_served_with_a_documented_status_and_content_type() {
    let app = spawn(Options::without_broker()).await;
    let doc: Value = app.get_json("/openapi.json").await;
    assert_eq!(doc["openapi"], "3.0.3");
    let schemas: Value = app.get_json("/v1/schemas").await;
    let some_id = schemas["event_types"][0]["versions"][0]["id"].to_string();

    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 16, "{} paths documented", paths.len());
    for (template, operations) in paths {
        for (method, operation) in operations.as_object().unwrap() {
            let path = sample_path(template).replace("{id}", &some_id);
            let url = format!("{}{path}", app.url);
            let request = match method.as_str() {
                "get" => app.client.get(&url),
                "post" => app
                    .client
                    .post(&url)
                    .json(&json!({"event_type": "agent.created", "source": "t", "data": {}})),
                other => panic!("undocumented method {other}"),
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16().to_string();
            let documented = &operation["responses"][&status];
            assert!(
                documented.is_object(),
                "{method} {path} answered {status}, not documented"
            );
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_string();
            let types: Vec<&String> = documented["content"].as_object().unwrap().keys().collect();
            assert!(
                types.iter().any(|t| content_type.starts_with(t.as_str())),
                "{method} {path}: content type {content_type} not in {types:?}"
            );
        }
    }
}

#[tokio::test]
async fn an_unknown_path_is_a_json_404() {
    let app = spawn(Options::without_broker()).await;
    let response = app.get("/v1/nothing-here").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,8}".prop_map(Value::String),
        Just(json!("agent.created")),
        Just(json!("workflow.started")),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        let keys = prop_oneof![
            Just("event_type".to_string()),
            Just("source".to_string()),
            Just("data".to_string()),
            Just("event_version".to_string()),
            Just("metadata".to_string()),
            Just("timestamp".to_string()),
            Just("agent_id".to_string()),
            Just("steps".to_string()),
            ".{0,5}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Random JSON, random bytes and random paths: never a 500, always the error shape.
#[test]
fn random_requests_never_get_a_500() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(spawn(Options::without_broker()));
    let check = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        assert!(status < 500 || status == 503, "status {status}");
        if status >= 400 {
            let body: Value = response.json().await.expect("errors are JSON");
            assert!(
                body["error"]["code"].is_string() || body["error_code"].is_number(),
                "{body}"
            );
        }
    };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(400));
    runner
        .run(
            &(
                arb_json(),
                prop::collection::vec(any::<u8>(), 0..64),
                "[a-z0-9./{}%-]{0,20}",
            ),
            |(json, bytes, path)| {
                runtime.block_on(async {
                    check(app.post(&json).await).await;
                    check(app.post_raw(bytes).await).await;
                    check(
                        app.get(&format!("/v1/schemas/{path}/versions/{path}"))
                            .await,
                    )
                    .await;
                    check(
                        app.get(&format!("/registry/subjects/{path}/versions/{path}"))
                            .await,
                    )
                    .await;
                    check(app.get(&format!("/registry/schemas/ids/{path}")).await).await;
                });
                Ok(())
            },
        )
        .unwrap();
}
