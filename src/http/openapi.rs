//! The OpenAPI 3 description of the API, served at `/openapi.json`.

use serde_json::{Value, json};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn registry_error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/vnd.schemaregistry.v1+json": {"schema": {"$ref": "#/components/schemas/RegistryError"}}}
    })
}

fn registry_ok(description: &str, schema: Value) -> Value {
    json!({
        "description": description,
        "content": {"application/vnd.schemaregistry.v1+json": {"schema": schema}}
    })
}

fn path_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": {"type": "string"}})
}

fn avro_schema_response() -> Value {
    json!({
        "description": "The Avro schema (JSON).",
        "content": {"application/json": {"schema": {"type": "object", "additionalProperties": true}}}
    })
}

/// The document. Every route of [`super::router`] is in it, and nothing else.
pub fn openapi() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "agentbus",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Schema-validated, versioned events on Kafka. Errors are always {\"error\":{\"code\",\"message\",\"details\"}}: also 405 method_not_allowed (with Allow) for a method a path does not take, and 413 payload_too_large for a body over the limit (--max-body-bytes, the same for every endpoint; answered from Content-Length before the body is read)."
        },
        "paths": {
            "/v1/events": {"post": {
                "summary": "Publish one event or a batch; answered once the broker acknowledged (acks=all).",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false,
                    "description": "Wins over the envelope's idempotency_key; in a batch item i gets <key>/<i>.",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 256}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"oneOf": [
                    {"$ref": "#/components/schemas/Envelope"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/Envelope"}, "minItems": 1}
                ]}}}},
                "responses": {
                    "200": {"description": "Written (or a repeat of an earlier write: duplicate=true, header Idempotent-Replayed).",
                        "headers": {"Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}}},
                        "content": {"application/json": {"schema": {"oneOf": [
                            {"$ref": "#/components/schemas/PublishResult"},
                            {"type": "object", "required": ["results"], "properties": {"results": {"type": "array", "items": {"$ref": "#/components/schemas/PublishResult"}}}}
                        ]}}}},
                    "400": error_response("malformed_json or invalid_envelope."),
                    "408": error_response("request_timeout: the request body was still arriving when the request timeout (AGENTBUS_REQUEST_TIMEOUT) passed; the client was too slow, not the broker."),
                    "409": error_response("idempotency_conflict: the key was used with a different body, or is in use right now."),
                    "413": error_response("payload_too_large: body or batch over the limit, or an event larger than the broker takes (the smaller of the producer's message.max.bytes and the topic's max.message.bytes, less record overhead; the message names it)."),
                    "422": error_response("unknown_event_type, unknown_event_version or schema_violation; nothing written."),
                    "500": error_response("internal: a fault of the service (its disk), never of the input."),
                    "503": {"description": "broker_unavailable (the broker did not acknowledge in time, or the service is at its limit of publishes in flight or of open connections); retry after Retry-After seconds with the same idempotency keys.",
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                }
            }},
            "/v1/schemas": {"get": {
                "summary": "Event types, their versions, schema ids and topics.",
                "responses": {"200": {"description": "The event types.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SchemaList"}}}}}
            }},
            "/v1/schemas/{event_type}/versions/{version}": {"get": {
                "summary": "The Avro schema of one version (a number or latest); its id in Agentbus-Schema-Id.",
                "parameters": [path_param("event_type", "e.g. agent.created"), path_param("version", "1, 2, ... or latest")],
                "responses": {"200": avro_schema_response(), "404": error_response("No such type or version.")}
            }},
            "/registry/schemas/ids/{id}": {"get": {
                "summary": "Confluent Schema Registry: a schema by id.",
                "parameters": [path_param("id", "schema id")],
                "responses": {"200": registry_ok("The schema as a string.", json!({"type": "object", "required": ["schema"], "properties": {"schema": {"type": "string"}}})),
                    "404": registry_error("40403 Schema not found.")}
            }},
            "/registry/schemas/ids/{id}/schema": {"get": {
                "summary": "Confluent Schema Registry: the schema alone, by id.",
                "parameters": [path_param("id", "schema id")],
                "responses": {"200": avro_schema_response(), "404": registry_error("40403 Schema not found.")}
            }},
            "/registry/schemas/types": {"get": {
                "summary": "Confluent Schema Registry: schema types served.",
                "responses": {"200": registry_ok("Always [\"AVRO\"].", json!({"type": "array", "items": {"type": "string"}}))}
            }},
            "/registry/subjects": {"get": {
                "summary": "Confluent Schema Registry: subjects (= event types).",
                "responses": {"200": registry_ok("Subject names.", json!({"type": "array", "items": {"type": "string"}}))}
            }},
            "/registry/subjects/{subject}/versions": {"get": {
                "summary": "Confluent Schema Registry: versions of a subject.",
                "parameters": [path_param("subject", "an event type")],
                "responses": {"200": registry_ok("Version numbers.", json!({"type": "array", "items": {"type": "integer"}})),
                    "404": registry_error("40401 Subject not found.")}
            }},
            "/registry/subjects/{subject}/versions/{version}": {"get": {
                "summary": "Confluent Schema Registry: one version of a subject.",
                "parameters": [path_param("subject", "an event type"), path_param("version", "a number or latest")],
                "responses": {"200": registry_ok("The version.", json!({"$ref": "#/components/schemas/RegistryVersion"})),
                    "404": registry_error("40401 Subject not found or 40402 Version not found."),
                    "422": registry_error("42202 Invalid version.")}
            }},
            "/registry/subjects/{subject}/versions/{version}/schema": {"get": {
                "summary": "Confluent Schema Registry: the schema alone of one version.",
                "parameters": [path_param("subject", "an event type"), path_param("version", "a number or latest")],
                "responses": {"200": avro_schema_response(),
                    "404": registry_error("40401 Subject not found or 40402 Version not found."),
                    "422": registry_error("42202 Invalid version.")}
            }},
            "/registry/config": {"get": {
                "summary": "Confluent Schema Registry: the global compatibility level.",
                "responses": {"200": registry_ok("The level.", json!({"type": "object", "properties": {"compatibilityLevel": {"type": "string"}}}))}
            }},
            "/registry/config/{subject}": {"get": {
                "summary": "Confluent Schema Registry: a subject's compatibility level.",
                "parameters": [path_param("subject", "an event type")],
                "responses": {"200": registry_ok("The level.", json!({"type": "object", "properties": {"compatibilityLevel": {"type": "string", "enum": ["BACKWARD", "NONE"]}}})),
                    "404": registry_error("40401 Subject not found.")}
            }},
            "/v1/dlq/{group}": {"get": {
                "summary": "A page of an agent's dead letters, partition by partition, oldest first within each; `next` is the cursor of the following page (absent at the end the topic had when the page was read). A page is read within 10 s; one cut short by that still answers what it read, with its `next`.",
                "parameters": [path_param("group", "the agent's name (its consumer group)"),
                    {"name": "limit", "in": "query", "required": false, "description": "Dead letters in the page (default 100).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "after", "in": "query", "required": false, "description": "Start where the page that answered this `next` ended (opaque).",
                        "schema": {"type": "string"}},
                    {"name": "since", "in": "query", "required": false, "description": "Start at the first dead letter whose record time (the original event's time) is at or after this (not with after).",
                        "schema": {"type": "string", "format": "date-time"}}],
                "responses": {
                    "200": {"description": "The page.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DeadLetters"}}}},
                    "400": error_response("invalid_parameter: a group name no consumer group can have, a limit out of range, a cursor that does not parse, a bad time, or both after and since."),
                    "404": error_response("No such agent."),
                    "503": error_response("broker_unavailable.")
                }
            }},
            "/v1/dlq/{group}/redrive": {"post": {
                "summary": "Send dead letters back to the agent (through <group>.replay, with a replay id per dead letter).",
                "parameters": [path_param("group", "the agent's name (its consumer group)")],
                "requestBody": {"required": false, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": false,
                    "properties": {"event_type": {"type": "string"}, "since": {"type": "string", "format": "date-time"}}
                }}}},
                "responses": {
                    "200": {"description": "How many were sent.", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["group", "redriven", "skipped", "skipped_ranges"],
                        "properties": {"group": {"type": "string"}, "redriven": {"type": "integer"},
                            "skipped": {"type": "integer", "description": "Records skipped because the Kafka client cannot read them (not sent back; still in the topic)."},
                            "skipped_ranges": {"type": "array", "items": {"$ref": "#/components/schemas/SkippedRange"}}}}}}},
                    "400": error_response("malformed_json or invalid_envelope (a bad filter); invalid_parameter: a group name no consumer group can have."),
                    "404": error_response("No such agent."),
                    "408": error_response("request_timeout: the request body was still arriving when the request timeout (AGENTBUS_REQUEST_TIMEOUT) passed; the client was too slow, not the broker."),
                    "413": error_response("payload_too_large: the body is over the limit."),
                    "503": error_response("broker_unavailable.")
                }
            }},
            "/v1/consumers": {"get": {
                "summary": "Consumer groups of the cluster (agents and others): state and members when the broker describes groups, lag.",
                "responses": {
                    "200": {"description": "The groups, from the lag monitor's latest collection.", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["cluster_name", "collected_at", "consumers"],
                        "properties": {"cluster_name": {"type": "string"}, "collected_at": {"type": "string", "format": "date-time"},
                            "members_unknown": {"type": "string", "nullable": true, "description": "Why state and members are unknown (the broker failed DescribeGroups)."},
                            "consumers": {"type": "array", "items": {"type": "object", "properties": {
                                "group": {"type": "string"}, "agent": {"type": "boolean"},
                                "state": {"type": "string", "nullable": true},
                                "members": {"type": "array", "nullable": true, "items": {"type": "object"}},
                                "sum_lag": {"type": "integer"}, "max_lag": {"type": "integer"},
                                "max_lag_seconds": {"type": "number"}, "partitions": {"type": "integer"}}}}}}}}},
                    "503": error_response("broker_unavailable.")
                }
            }},
            "/v1/consumers/{group}/lag": {"get": {
                "summary": "A group's lag per partition, collected now: committed offset, end offset, lag, and lag in seconds (the age of the oldest unconsumed record, from its own timestamp).",
                "parameters": [path_param("group", "the consumer group")],
                "responses": {
                    "200": {"description": "The lag.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GroupLag"}}}},
                    "400": error_response("invalid_parameter: a name no consumer group can have (empty, over 255 characters, control characters, leading or trailing white space)."),
                    "404": error_response("No such group (none with committed offsets)."),
                    "503": error_response("broker_unavailable.")
                }
            }},
            "/v1/replays": {"post": {
                "summary": "Start a replay in the background: copy the records of [from, until) (end offsets fixed at the start) into an agent's <agent>.replay topic or another topic, with a replay id.",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": false, "required": ["from"],
                    "properties": {
                        "from": {"type": "string", "description": "RFC 3339, or a duration back from now (2h, 30m)."},
                        "until": {"type": "string", "description": "RFC 3339, or a duration back from now."},
                        "topic": {"type": "string"}, "topics": {"type": "array", "items": {"type": "string"}},
                        "event_types": {"type": "array", "items": {"type": "string"}, "description": "Event types or patterns (agent.task.*)."},
                        "to_agent": {"type": "string"}, "into_topic": {"type": "string"},
                        "replay_id": {"type": "string", "minLength": 1, "maxLength": 200, "description": "Reusing one makes the agent skip what it handled under it."}
                    }}}}},
                "responses": {
                    "202": {"description": "Started; Location names the job.", "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReplayJob"}}}},
                    "400": error_response("malformed_json or invalid_envelope: a bad time (or one outside the years 0 to 9999), from after until, nothing to replay, both or neither target."),
                    "404": error_response("No such topic or agent."),
                    "408": error_response("request_timeout: the request body was still arriving when the request timeout (AGENTBUS_REQUEST_TIMEOUT) passed; the client was too slow, not the broker."),
                    "413": error_response("payload_too_large: the body is over the limit."),
                    "503": error_response("broker_unavailable.")
                }
            }},
            "/v1/replays/{id}": {"get": {
                "summary": "A replay job: status (running, succeeded, failed with the reason), matched, copied, progress. Jobs live in the process's memory.",
                "parameters": [path_param("id", "the job id (= its replay id)")],
                "responses": {
                    "200": {"description": "The job.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReplayJob"}}}},
                    "404": error_response("No such job in this process.")
                }
            }},
            "/demo/agents/{name}": {"post": {
                "summary": "A demo webhook agent served by agentbus itself: answers an agent.task.requested CloudEvent with an agent.task.completed follow-up.",
                "parameters": [path_param("name", "the demo agent's name (becomes the follow-up's source)")],
                "requestBody": {"required": true, "content": {"application/cloudevents+json": {"schema": {"type": "object"}}}},
                "responses": {
                    "200": {"description": "Follow-up events, if any.", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "400": error_response("malformed_json."),
                    "413": error_response("payload_too_large: the body is over the limit.")
                }
            }},
            "/v1/integrations": {"get": {
                "summary": "Services of the integration agents: circuit breaker state, failures, rate limit.",
                "responses": {"200": {"description": "The services.", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["integrations"],
                    "properties": {"integrations": {"type": "array", "items": {"type": "object", "properties": {
                        "service": {"type": "string"}, "base_url": {"type": "string"},
                        "state": {"type": "string", "enum": ["closed", "half_open", "open"]},
                        "consecutive_failures": {"type": "integer"}, "failure_threshold": {"type": "integer"},
                        "cooldown_ms": {"type": "integer"}, "rate_per_second": {"type": "number"}, "burst": {"type": "integer"}}}}}}}}}}
            }},
            "/healthz": {"get": {"summary": "The process is alive.",
                "responses": {"200": {"description": "Alive.", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/readyz": {"get": {"summary": "Ready: broker reachable, topics present, schemas loaded.",
                "responses": {
                    "200": {"description": "Ready.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
                    "503": {"description": "Not ready; checks say which part is missing.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}}
                }}},
            "/metrics": {"get": {"summary": "Prometheus text format.",
                "responses": {"200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3.", "content": {"application/json": {"schema": {"type": "object"}}}}}}}
        },
        "components": {"schemas": {
            "Envelope": {
                "type": "object",
                "required": ["event_type", "source", "data"],
                "additionalProperties": false,
                "properties": {
                    "event_type": {"type": "string", "pattern": "^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*)+$", "maxLength": 256},
                    "event_version": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string"}]},
                    "source": {"type": "string", "minLength": 1, "maxLength": 256},
                    "data": {"type": "object", "description": "Validated against schemas/<event_type>/v<N>.avsc."},
                    "event_id": {"type": "string", "format": "uuid"},
                    "timestamp": {"type": "string", "format": "date-time"},
                    "partition_key": {"type": "string", "minLength": 1},
                    "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 256},
                    "ttl_ms": {"type": "integer", "minimum": 1},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}}
                }
            },
            "PublishResult": {
                "type": "object",
                "required": ["event_id", "event_type", "event_version", "topic", "partition", "offset", "duplicate"],
                "properties": {
                    "event_id": {"type": "string"}, "event_type": {"type": "string"},
                    "event_version": {"type": "integer"}, "topic": {"type": "string"},
                    "partition": {"type": "integer"}, "offset": {"type": "integer"},
                    "duplicate": {"type": "boolean"}
                }
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "object", "required": ["code", "message", "details"], "properties": {
                    "code": {"type": "string", "enum": ["malformed_json", "invalid_envelope", "invalid_parameter", "unauthorized", "forbidden", "not_found", "method_not_allowed",
                        "idempotency_conflict", "payload_too_large", "unknown_event_type", "unknown_event_version",
                        "schema_violation", "rate_limited", "broker_unavailable", "internal"]},
                    "message": {"type": "string"},
                    "details": {"type": "array", "items": {"type": "object", "required": ["path", "message"],
                        "properties": {"path": {"type": "string"}, "message": {"type": "string"}}}}
                }}}
            },
            "SchemaList": {
                "type": "object",
                "required": ["event_types"],
                "properties": {"event_types": {"type": "array", "items": {"type": "object", "properties": {
                    "event_type": {"type": "string"}, "topic": {"type": "string"},
                    "compatibility": {"type": "string", "enum": ["backward", "none"]},
                    "description": {"type": "string", "nullable": true},
                    "latest_version": {"type": "integer"},
                    "versions": {"type": "array", "items": {"type": "object", "properties": {"version": {"type": "integer"}, "id": {"type": "integer"}}}}
                }}}}
            },
            "RegistryVersion": {
                "type": "object",
                "required": ["subject", "version", "id", "schema"],
                "properties": {"subject": {"type": "string"}, "version": {"type": "integer"}, "id": {"type": "integer"}, "schema": {"type": "string"}}
            },
            "RegistryError": {
                "type": "object",
                "required": ["error_code", "message"],
                "properties": {"error_code": {"type": "integer"}, "message": {"type": "string"}}
            },
            "DeadLetters": {
                "type": "object",
                "required": ["group", "topic", "dead_letters", "skipped"],
                "properties": {"group": {"type": "string"}, "topic": {"type": "string"},
                    "next": {"type": "string", "description": "The cursor of the next page (for after), past any skipped range; absent at the end."},
                    "skipped": {"type": "array", "description": "Ranges of offsets this page skipped because the Kafka client cannot read them (a corrupt or undecodable batch, a record too large for the fetch settings); they are still in the topic, for Kafka's own tools.",
                        "items": {"$ref": "#/components/schemas/SkippedRange"}},
                    "dead_letters": {"type": "array", "items": {"type": "object", "properties": {
                        "failed_at": {"type": "string", "nullable": true}, "event_type": {"type": "string", "nullable": true},
                        "event_id": {"type": "string", "nullable": true}, "attempts": {"type": "integer", "nullable": true},
                        "error_kind": {"type": "string", "nullable": true}, "error_message": {"type": "string", "nullable": true},
                        "original_topic": {"type": "string", "nullable": true}, "original_partition": {"type": "integer", "nullable": true},
                        "original_offset": {"type": "integer", "nullable": true},
                        "dlq_partition": {"type": "integer"}, "dlq_offset": {"type": "integer"}}}}}
            },
            "SkippedRange": {
                "type": "object",
                "required": ["partition", "from_offset", "to_offset", "reason"],
                "properties": {"partition": {"type": "integer"}, "from_offset": {"type": "integer"},
                    "to_offset": {"type": "integer", "description": "The last offset skipped (inclusive)."},
                    "reason": {"type": "string", "description": "The Kafka client's error code, e.g. BadCompression."}}
            },
            "GroupLag": {
                "type": "object",
                "required": ["group", "partitions", "sum_lag", "max_lag", "max_lag_seconds"],
                "properties": {"cluster_name": {"type": "string"}, "collected_at": {"type": "string", "format": "date-time"},
                    "group": {"type": "string"}, "state": {"type": "string", "nullable": true},
                    "members": {"type": "array", "nullable": true, "items": {"type": "object"}},
                    "members_unknown": {"type": "string", "nullable": true},
                    "sum_lag": {"type": "integer"}, "max_lag": {"type": "integer"}, "max_lag_seconds": {"type": "number"},
                    "partitions": {"type": "array", "items": {"type": "object", "properties": {
                        "topic": {"type": "string"}, "partition": {"type": "integer"},
                        "committed_offset": {"type": "integer"}, "earliest_offset": {"type": "integer"},
                        "end_offset": {"type": "integer"}, "lag": {"type": "integer"}, "lag_seconds": {"type": "number"},
                        "lag_seconds_basis": {"type": "string", "enum": ["caught_up", "record", "open_transaction", "no_consumable_record", "lower_bound"],
                            "description": "What lag_seconds rests on; lower_bound: the record at the committed offset could not be read in time."},
                        "lag_seconds_note": {"type": "string", "description": "Why, where the basis is neither record nor caught_up."},
                        "oldest_unconsumed_at": {"type": "string", "format": "date-time", "nullable": true}}}}}
            },
            "ReplayJob": {
                "type": "object",
                "required": ["id", "status", "total", "scanned", "matched", "copied", "progress", "target_topic"],
                "properties": {"id": {"type": "string"}, "status": {"type": "string", "enum": ["running", "succeeded", "failed"]},
                    "error": {"type": "string", "description": "Why it failed."},
                    "started_at": {"type": "string", "format": "date-time"}, "request": {"type": "object"},
                    "target_topic": {"type": "string"}, "total": {"type": "integer", "description": "Records in the fixed ranges."},
                    "scanned": {"type": "integer"}, "matched": {"type": "integer"}, "copied": {"type": "integer"},
                    "progress": {"type": "number", "minimum": 0, "maximum": 1}, "seconds": {"type": "number"},
                    "partitions": {"type": "array", "items": {"type": "object"}},
                    "stalled_partitions": {"type": "array", "description": "Partitions given up because no record could be read for the stall timeout: topic, partition, at_offset, end_offset, reason.",
                        "items": {"type": "object"}},
                    "note": {"type": "string"}}
            },
            "Readiness": {
                "type": "object",
                "required": ["status", "checks"],
                "properties": {"status": {"type": "string", "enum": ["ready", "not_ready"]},
                    "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
                    "idempotency_store_failure": {"type": "string", "description": "Why the idempotency store stopped working (then every publish fails until the service is restarted)."}}
            }
        }}
    })
}
