//! A seam for tests: makes an agent's lane fail as a bug would, so that tests can check that
//! a failed lane is seen (logged, counted, `/readyz` 503, `agent run` exiting non-zero).
//! Nothing in agentbus calls [`panic_next_event_of`]; in production [`strike`] costs one
//! relaxed atomic load per event.

use std::{
    collections::HashSet,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

/// Whether any fault is armed (the fast path).
static ARMED: AtomicBool = AtomicBool::new(false);
/// Agents whose next event panics their lane.
static AGENTS: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Makes the next event a lane of `agent` takes panic that lane (once). For tests only.
#[doc(hidden)]
pub fn panic_next_event_of(agent: &str) {
    AGENTS
        .lock()
        .expect("not poisoned")
        .get_or_insert_with(HashSet::new)
        .insert(agent.to_string());
    ARMED.store(true, Ordering::SeqCst);
}

/// Panics when a fault is armed for `agent`.
pub(super) fn strike(agent: &str) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    let armed = AGENTS
        .lock()
        .expect("not poisoned")
        .as_mut()
        .is_some_and(|agents| agents.remove(agent));
    if armed {
        panic!("injected fault: the lane of agent {agent} panics (a test asked for it)");
    }
}
