//! Client sessions: each client holds one long request open (`POST /v1/session`) whose
//! body it never finishes. When the client process dies, its kernel closes the
//! connection and the server sees the body end at once; if the client does not open a
//! new session within a short grace, its jobs are taken back and queued again. This
//! finds a dead client in about a second, where a lease-only design waits the whole
//! lease. A client that is cut off or frozen keeps its connection open and is found by
//! its lease instead.

use std::collections::HashMap;
use std::sync::Mutex;

/// The open sessions of each client.
#[derive(Default)]
pub struct Sessions {
    clients: Mutex<HashMap<String, ClientSessions>>,
}

#[derive(Default)]
struct ClientSessions {
    /// Sessions open now.
    n_open: u32,
    /// Counts every session ever opened, so that "a new one came since" is a comparison.
    generation: u64,
}

impl Sessions {
    /// Records a new session of `client_id`; returns its generation.
    pub fn open(&self, client_id: &str) -> u64 {
        let mut clients = self.clients.lock().expect("sessions poisoned");
        let entry = clients.entry(client_id.to_owned()).or_default();
        entry.n_open += 1;
        entry.generation += 1;
        entry.generation
    }

    /// Records that a session ended.
    pub fn close(&self, client_id: &str) {
        let mut clients = self.clients.lock().expect("sessions poisoned");
        if let Some(entry) = clients.get_mut(client_id) {
            entry.n_open = entry.n_open.saturating_sub(1);
        }
    }

    /// Whether the client has had no session since the one of `generation` ended.
    pub fn gone_since(&self, client_id: &str, generation: u64) -> bool {
        let clients = self.clients.lock().expect("sessions poisoned");
        clients
            .get(client_id)
            .is_none_or(|entry| entry.n_open == 0 && entry.generation == generation)
    }

    /// Whether the client has a session open now.
    pub fn is_open(&self, client_id: &str) -> bool {
        let clients = self.clients.lock().expect("sessions poisoned");
        clients.get(client_id).is_some_and(|entry| entry.n_open > 0)
    }

    /// How many clients have a session open now.
    pub fn n_connected(&self) -> usize {
        let clients = self.clients.lock().expect("sessions poisoned");
        clients.values().filter(|entry| entry.n_open > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_reconnects_is_not_gone() {
        let sessions = Sessions::default();
        let first = sessions.open("c1");
        sessions.close("c1");
        assert!(sessions.gone_since("c1", first));
        let second = sessions.open("c1");
        assert!(!sessions.gone_since("c1", first));
        sessions.close("c1");
        assert!(!sessions.gone_since("c1", first));
        assert!(sessions.gone_since("c1", second));
    }

    #[test]
    fn two_open_sessions_keep_a_client_connected() {
        let sessions = Sessions::default();
        sessions.open("c1");
        let second = sessions.open("c1");
        sessions.close("c1");
        assert!(!sessions.gone_since("c1", second));
        assert_eq!(sessions.n_connected(), 1);
        assert!(sessions.is_open("c1"));
        sessions.close("c1");
        assert!(!sessions.is_open("c1"));
        assert!(!sessions.is_open("never-seen"));
    }
}
