//! The list of servers: who registered, their last report, and whether they are live;
//! saved to `servers.json` atomically (temporary file, fsync, rename, fsync of the
//! directory) and loaded at start.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use kiln_proto::api::ServerEntry;

/// What a server sends to register or heartbeat.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub url: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub builds: u64,
    #[serde(default)]
    pub queued: u64,
    #[serde(default)]
    pub running: u64,
}

/// The file's shape.
#[derive(Debug, Serialize, Deserialize)]
struct SavedList {
    version: u32,
    servers: Vec<ServerEntry>,
}

struct Slot {
    entry: ServerEntry,
    /// Live until this instant (unix micros): a heartbeat plus the timeout, or for a
    /// server loaded from the file, the master's start plus the timeout.
    live_until: i64,
    /// Whether it counted as live at the last sweep.
    was_live: bool,
}

/// The servers, in memory.
pub struct ServerList {
    path: PathBuf,
    timeout_micros: i64,
    slots: BTreeMap<String, Slot>,
    /// Something changed since the last save.
    dirty: bool,
}

/// What a registration changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A server not seen before.
    New,
    /// A server that had dropped off the list.
    Returned,
    /// A heartbeat from a live server.
    Heartbeat,
}

impl ServerList {
    /// Loads `path` if it exists. Loaded servers are live for one timeout from `now`.
    /// A damaged file gives an empty list and a warning, never an error.
    pub fn load(path: &Path, timeout_secs: u64, now: i64) -> Self {
        let timeout_micros = timeout_secs as i64 * 1_000_000;
        let mut list = ServerList {
            path: path.to_owned(),
            timeout_micros,
            slots: BTreeMap::new(),
            dirty: false,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return list,
            Err(err) => {
                tracing::warn!(path = %path.display(), cause = %err, "cannot read the saved server list: starting with an empty list");
                return list;
            }
        };
        let saved: SavedList = match serde_json::from_slice(&bytes) {
            Ok(saved) => saved,
            Err(err) => {
                tracing::warn!(path = %path.display(), cause = %err, "the saved server list is damaged: starting with an empty list");
                return list;
            }
        };
        if saved.version != 1 {
            tracing::warn!(path = %path.display(), version = saved.version, "the saved server list has an unknown version: starting with an empty list");
            return list;
        }
        for mut entry in saved.servers {
            entry.live = None;
            list.slots.insert(
                entry.url.clone(),
                Slot {
                    entry,
                    live_until: now + timeout_micros,
                    was_live: true,
                },
            );
        }
        tracing::info!(n_servers = list.slots.len(), "server list loaded");
        list
    }

    /// Records a registration or heartbeat at `now`.
    pub fn register(&mut self, reg: Registration, now: i64) -> Change {
        self.dirty = true;
        let live_until = now + self.timeout_micros;
        match self.slots.get_mut(&reg.url) {
            Some(slot) => {
                let change = if slot.was_live && now < slot.live_until {
                    Change::Heartbeat
                } else {
                    Change::Returned
                };
                let entry = &mut slot.entry;
                entry.name = reg.name;
                entry.builds = reg.builds;
                entry.queued = reg.queued;
                entry.running = reg.running;
                entry.last_heartbeat = now;
                slot.live_until = live_until;
                slot.was_live = true;
                change
            }
            None => {
                self.slots.insert(
                    reg.url.clone(),
                    Slot {
                        entry: ServerEntry {
                            url: reg.url,
                            name: reg.name,
                            builds: reg.builds,
                            queued: reg.queued,
                            running: reg.running,
                            last_heartbeat: now,
                            first_seen: now,
                            live: None,
                        },
                        live_until,
                        was_live: true,
                    },
                );
                Change::New
            }
        }
    }

    /// Notes servers that dropped off since the last sweep; returns their URLs.
    pub fn sweep(&mut self, now: i64) -> Vec<String> {
        let mut dropped = Vec::new();
        for (url, slot) in &mut self.slots {
            if slot.was_live && now >= slot.live_until {
                slot.was_live = false;
                dropped.push(url.clone());
            }
        }
        if !dropped.is_empty() {
            self.dirty = true;
        }
        dropped
    }

    /// The live servers, or with `all` every server with its `live` field.
    pub fn list(&self, all: bool, now: i64) -> Vec<ServerEntry> {
        self.slots
            .values()
            .filter_map(|slot| {
                let live = now < slot.live_until;
                if all {
                    let mut entry = slot.entry.clone();
                    entry.live = Some(live);
                    Some(entry)
                } else if live {
                    Some(slot.entry.clone())
                } else {
                    None
                }
            })
            .collect()
    }

    /// Whether something changed since the last [`ServerList::snapshot`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The bytes to save, and where; clears the dirty mark.
    pub fn snapshot(&mut self) -> (PathBuf, Vec<u8>) {
        self.dirty = false;
        let saved = SavedList {
            version: 1,
            servers: self.slots.values().map(|slot| slot.entry.clone()).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&saved).unwrap_or_default();
        (self.path.clone(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;
    const T0: i64 = 1_700_000_000 * SEC;

    fn reg(url: &str, queued: u64) -> Registration {
        Registration {
            url: url.into(),
            name: None,
            builds: 1,
            queued,
            running: 0,
        }
    }

    #[test]
    fn servers_drop_off_after_the_timeout_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut list = ServerList::load(&dir.path().join("servers.json"), 2, T0);
        assert_eq!(list.register(reg("http://a:1", 3), T0), Change::New);
        assert_eq!(
            list.register(reg("http://a:1", 4), T0 + SEC),
            Change::Heartbeat
        );
        assert_eq!(list.list(false, T0 + 2 * SEC)[0].queued, 4);
        assert!(list.sweep(T0 + 2 * SEC).is_empty());
        assert_eq!(list.sweep(T0 + 3 * SEC), vec!["http://a:1".to_owned()]);
        assert!(list.list(false, T0 + 3 * SEC).is_empty());
        let all = list.list(true, T0 + 3 * SEC);
        assert_eq!(all[0].live, Some(false));
        assert_eq!(
            list.register(reg("http://a:1", 0), T0 + 4 * SEC),
            Change::Returned
        );
        let back = list.list(false, T0 + 4 * SEC);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].first_seen, T0);
    }

    #[test]
    fn a_saved_list_loads_as_live_for_one_timeout_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("servers.json");
        let mut list = ServerList::load(&path, 2, T0);
        list.register(reg("http://a:1", 3), T0);
        list.register(reg("http://b:2", 5), T0);
        assert!(list.is_dirty());
        let (path, bytes) = list.snapshot();
        assert!(!list.is_dirty());
        kiln_common::fs::write_atomic(&path, &bytes).unwrap();

        // Restarted long after the last heartbeat: still listed until one timeout.
        let later = T0 + 100 * SEC;
        let mut loaded = ServerList::load(&path, 2, later);
        let listed = loaded.list(false, later);
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].url, "http://a:1");
        assert_eq!(listed[0].queued, 3);
        assert_eq!(listed[0].last_heartbeat, T0);
        assert_eq!(listed[1].queued, 5);
        assert_eq!(loaded.sweep(later + 2 * SEC).len(), 2);
        assert!(loaded.list(false, later + 2 * SEC).is_empty());
    }

    #[test]
    fn a_damaged_or_missing_file_gives_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("servers.json");
        assert!(ServerList::load(&path, 2, T0).list(true, T0).is_empty());
        std::fs::write(&path, b"{\"version\":1,\"servers\":[{\"url\":").unwrap();
        assert!(ServerList::load(&path, 2, T0).list(true, T0).is_empty());
        std::fs::write(&path, b"\x00\xff garbage").unwrap();
        assert!(ServerList::load(&path, 2, T0).list(true, T0).is_empty());
        std::fs::write(&path, b"{\"version\":9,\"servers\":[]}").unwrap();
        assert!(ServerList::load(&path, 2, T0).list(true, T0).is_empty());
    }
}
