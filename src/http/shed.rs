//! Load shedding of publishes: at most [`Limits::max_publishes_in_flight`] publish requests
//! are worked on at once; one past that is refused at once, before its body is read, with
//! `503 broker_unavailable` and `Retry-After`.
//!
//! Without it an overloaded service takes every request it is sent: each waits its turn for
//! the CPU, the producer's queue and the idempotency store, latency grows with the queue, the
//! queued bodies hold memory, and past the publish timeout every answer is a 503 anyway, after
//! the work was done. With it the accepted requests keep the latency the service has at its
//! limit, and the excess costs next to nothing (no body read, no JSON parsed) and hears so
//! within a millisecond, while there is still time to send it elsewhere.
//!
//! Why 503 and not 429: CONTRACT.md §2 offers `429 rate_limited` and `503
//! broker_unavailable` (both with `Retry-After`). 429 says "you, this client, sent too many"
//! (it is what a key over its own rate gets, in `access`); an overloaded service refuses every
//! client alike, whatever each sent, which is RFC 9110's 503: "temporarily unable to handle
//! the request due to a temporary overload". A client's handling of 503 is also the right one
//! here: wait `Retry-After`, retry with the same idempotency key, or try another instance.
//! Nothing of a refused request was written, as for every 503 before the broker's ack.
//!
//! [`Limits::max_publishes_in_flight`]: super::Limits::max_publishes_in_flight

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::Method,
    middleware::Next,
    response::{IntoResponse, Response},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use crate::telemetry;

/// The publish slots of one service.
#[derive(Debug)]
pub struct PublishGate {
    slots: Arc<Semaphore>,
    limit: usize,
}

impl PublishGate {
    /// A gate letting `limit` publishes through at once (at least one).
    pub fn new(limit: usize) -> PublishGate {
        let limit = limit.max(1);
        PublishGate {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// A slot, held until the permit is dropped; `None` when every slot is taken.
    pub fn try_enter(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Publishes being worked on now.
    pub fn in_flight(&self) -> usize {
        self.limit - self.slots.available_permits()
    }

    /// Most publishes worked on at once.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Whether a request is a publish (the only requests the gate holds).
fn is_publish(request: &Request) -> bool {
    request.method() == Method::POST && request.uri().path() == "/v1/events"
}

/// The gate, as an axum middleware: after the access checks (a key over its own rate still
/// hears 429, an unknown key 401) and before the body limit reads the body.
pub async fn gate(State(gate): State<Arc<PublishGate>>, request: Request, next: Next) -> Response {
    if !is_publish(&request) {
        return next.run(request).await;
    }
    let Some(permit) = gate.try_enter() else {
        metrics::counter!(telemetry::HTTP_REQUESTS_SHED).increment(1);
        let refusal = ApiError::broker_unavailable(format!(
            "the service is at its limit of {} publishes in flight; nothing was written, retry later",
            gate.limit()
        ))
        .into_response();
        // Not read, but drained as the other early refusals are, so a client that writes its
        // whole body before reading sees this answer rather than a broken pipe.
        return super::body::refuse_unread(request, refusal);
    };
    metrics::gauge!(telemetry::PUBLISHES_IN_FLIGHT).set(gate.in_flight() as f64);
    // The request runs on a task of its own that holds the slot until the publish is over:
    // a client that hangs up (or the request timeout) drops only its wait for the answer, and
    // the publish it started, which runs on (see events::handle), keeps its slot. Otherwise
    // clients that give up would let ever more publishes run than the limit says.
    let run = tokio::spawn(async move {
        let response = next.run(request).await;
        drop(permit);
        metrics::gauge!(telemetry::PUBLISHES_IN_FLIGHT).set(gate.in_flight() as f64);
        response
    });
    match run.await {
        Ok(response) => response,
        Err(e) => ApiError::internal(format!("publish task failed: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_lets_its_limit_through_and_frees_a_slot_when_a_permit_drops() {
        let gate = PublishGate::new(2);
        let a = gate.try_enter().expect("first slot");
        let _b = gate.try_enter().expect("second slot");
        assert_eq!(gate.in_flight(), 2);
        assert!(gate.try_enter().is_none(), "no third slot");
        drop(a);
        assert_eq!(gate.in_flight(), 1);
        assert!(gate.try_enter().is_some());
        assert_eq!(PublishGate::new(0).limit(), 1, "at least one slot");
    }
}
