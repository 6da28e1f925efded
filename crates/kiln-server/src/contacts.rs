//! The latest contact with each client, kept in memory: claims, heartbeats, log
//! batches and session keep-alives note it in [`Contacts`], and the store gets it at
//! most every [`WRITE_INTERVAL_MICROS`] per client, so that a heartbeat costs no
//! database write of its own. A claim and the end of a job write the contact in their
//! own transaction. `GET /v1/clients` merges what is here with what the store has.
//!
//! A client that has not claimed a job here yet is known only from here: what it said
//! in its claim requests, since this server process started.

use std::collections::HashMap;
use std::sync::Mutex;

/// The longest a client's latest contact stays in memory only.
pub const WRITE_INTERVAL_MICROS: i64 = 10 * 1_000_000;

/// What a client said of itself in a claim request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    pub include: Vec<String>,
    pub slots: Option<u32>,
    pub version: Option<String>,
}

/// One client's latest contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// The first time this server process heard from it.
    pub first_at: i64,
    /// The latest time.
    pub at: i64,
    /// The IP address of the latest request that had one.
    pub address: Option<String>,
    /// What it said in its latest claim request, if it made one since this server
    /// started.
    pub announced: Option<Announced>,
    /// When the store last got its contact; 0 for never.
    written_at: i64,
    /// The store said it has no such client (it never claimed a job here): writing its
    /// contact is pointless until it claims one.
    unknown_to_store: bool,
}

/// The latest contact with every client heard from since the server started.
#[derive(Default)]
pub struct Contacts {
    clients: Mutex<HashMap<String, Contact>>,
}

impl Contacts {
    /// Notes a contact from `client_id` at `now`; returns whether the store should get
    /// it now (and counts it as written).
    pub fn note(&self, client_id: &str, address: Option<&str>, now: i64) -> bool {
        let mut clients = self.clients.lock().expect("contacts poisoned");
        let contact = entry(&mut clients, client_id, now);
        contact.at = contact.at.max(now);
        if let Some(address) = address {
            contact.address = Some(address.to_owned());
        }
        let due = !contact.unknown_to_store && now - contact.written_at >= WRITE_INTERVAL_MICROS;
        if due {
            contact.written_at = now;
        }
        due
    }

    /// Notes what a client said of itself in a claim request.
    pub fn announced(&self, client_id: &str, announced: Announced, now: i64) {
        let mut clients = self.clients.lock().expect("contacts poisoned");
        entry(&mut clients, client_id, now).announced = Some(announced);
    }

    /// Records that the store has the client's contact of `now` (a claim wrote it).
    pub fn stored(&self, client_id: &str, now: i64) {
        let mut clients = self.clients.lock().expect("contacts poisoned");
        let contact = entry(&mut clients, client_id, now);
        contact.written_at = contact.written_at.max(now);
        contact.unknown_to_store = false;
    }

    /// Records that the store had no record of the client when it was given the
    /// contact of `written_at` (unless a claim has recorded the client since).
    pub fn unknown_to_store(&self, client_id: &str, written_at: i64) {
        let mut clients = self.clients.lock().expect("contacts poisoned");
        if let Some(contact) = clients.get_mut(client_id) {
            if contact.written_at <= written_at {
                contact.unknown_to_store = true;
            }
        }
    }

    /// Every client's latest contact.
    pub fn snapshot(&self) -> HashMap<String, Contact> {
        self.clients.lock().expect("contacts poisoned").clone()
    }
}

fn entry<'a>(
    clients: &'a mut HashMap<String, Contact>,
    client_id: &str,
    now: i64,
) -> &'a mut Contact {
    clients
        .entry(client_id.to_owned())
        .or_insert_with(|| Contact {
            first_at: now,
            at: now,
            address: None,
            announced: None,
            written_at: 0,
            unknown_to_store: false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;

    #[test]
    fn a_contact_is_due_for_the_store_at_most_once_per_interval() {
        let contacts = Contacts::default();
        assert!(contacts.note("c1", Some("10.0.0.1"), 100 * SEC));
        assert!(!contacts.note("c1", None, 101 * SEC));
        assert!(!contacts.note("c1", None, 109 * SEC));
        assert!(contacts.note("c1", None, 110 * SEC));
        assert!(
            contacts.note("c2", None, 110 * SEC),
            "each client on its own"
        );
        let snapshot = contacts.snapshot();
        assert_eq!(snapshot["c1"].at, 110 * SEC);
        assert_eq!(snapshot["c1"].first_at, 100 * SEC);
        assert_eq!(snapshot["c1"].address.as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn a_claim_counts_as_written_and_a_client_unknown_to_the_store_is_not_written() {
        let contacts = Contacts::default();
        contacts.stored("c1", 100 * SEC);
        assert!(!contacts.note("c1", None, 105 * SEC));
        assert!(contacts.note("c1", None, 111 * SEC));

        assert!(contacts.note("idle", None, 100 * SEC));
        contacts.unknown_to_store("idle", 100 * SEC);
        assert!(!contacts.note("idle", None, 200 * SEC));
        contacts.stored("idle", 210 * SEC);
        assert!(contacts.note("idle", None, 220 * SEC));

        // A claim that recorded the client while the store was being asked wins.
        assert!(contacts.note("racer", None, 100 * SEC));
        contacts.stored("racer", 101 * SEC);
        contacts.unknown_to_store("racer", 100 * SEC);
        assert!(contacts.note("racer", None, 112 * SEC));
    }

    #[test]
    fn an_older_contact_noted_late_does_not_move_the_latest_back() {
        let contacts = Contacts::default();
        contacts.note("c1", None, 100 * SEC);
        contacts.note("c1", None, 90 * SEC);
        assert_eq!(contacts.snapshot()["c1"].at, 100 * SEC);
    }
}
