//! Schema endpoints and the Confluent Schema Registry API; no broker needed.

mod common;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn the_registry_serves_subjects_versions_and_schemas_by_id_like_confluent() {
    let app = spawn(Options::without_broker()).await;
    let subjects: Vec<String> = app.get_json("/registry/subjects").await;
    assert!(subjects.contains(&"agent.created".to_string()));
    assert_eq!(subjects.len(), 14);

    let versions: Vec<u32> = app
        .get_json("/registry/subjects/agent.created/versions")
        .await;
    assert_eq!(versions, [1, 2]);

    let latest = app
        .get("/registry/subjects/agent.created/versions/latest")
        .await;
    assert_eq!(
        latest.headers()["content-type"],
        "application/vnd.schemaregistry.v1+json"
    );
    let latest: Value = latest.json().await.unwrap();
    assert_eq!(latest["version"], 2);
    let id = latest["id"].as_u64().unwrap();
    let by_id: Value = app.get_json(&format!("/registry/schemas/ids/{id}")).await;
    assert_eq!(by_id["schema"], latest["schema"]);
    apache_avro::Schema::parse_str(by_id["schema"].as_str().unwrap()).unwrap();

    let v1 = app.get("/v1/schemas/agent.created/versions/1").await;
    assert_eq!(v1.status(), 200);
    assert!(v1.headers().contains_key("agentbus-schema-id"));
    let v1: Value = v1.json().await.unwrap();
    assert_eq!(v1["name"], "AgentCreated");

    for (path, status, code) in [
        ("/registry/subjects/nope/versions", 404, 40401),
        ("/registry/subjects/agent.created/versions/7", 404, 40402),
        ("/registry/subjects/agent.created/versions/abc", 422, 42202),
        ("/registry/schemas/ids/1", 404, 40403),
    ] {
        let r = app.get(path).await;
        assert_eq!(r.status(), status, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error_code"], code, "{path}");
    }
    let r = app.get("/v1/schemas/agent.created/versions/9").await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn schema_ids_are_the_same_for_the_same_directory_on_every_instance() {
    let a = spawn(Options::without_broker()).await;
    let b = spawn(Options::without_broker()).await;
    let list_a: Value = a.get_json("/v1/schemas").await;
    let list_b: Value = b.get_json("/v1/schemas").await;
    assert_eq!(list_a["event_types"].as_array().unwrap().len(), 14);
    let ids = |v: &Value| -> Vec<(String, Value)> {
        v["event_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["event_type"].as_str().unwrap().to_string(),
                    t["versions"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(ids(&list_a), ids(&list_b));
}
