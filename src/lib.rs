#![recursion_limit = "256"]
#![forbid(unsafe_code)]
//! agentbus: schema-validated, versioned events on Kafka for multi-agent systems.
//!
//! The modules follow an event's way through the service:
//! [`http`] (ingest) → [`envelope`] (the contract's envelope) → [`schema`] (validate, encode)
//! → [`publish`] (idempotency, produce) → Kafka. Beside them: [`config`], [`topics`],
//! [`telemetry`], the [`cli`] client commands and [`app`], which wires a running service.

pub mod app;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod consume;
pub mod envelope;
pub mod handlers;
pub mod http;
pub mod lag;
pub mod publish;
pub mod ratelimit;
pub mod replay;
pub mod schema;
pub mod store;
pub mod telemetry;
pub mod topics;
pub mod window;
