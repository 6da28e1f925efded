//! Which client each lease was handed to, as far as this server knows: from its own
//! claims and from the store's answers. A lease token is given once, to one client, for
//! one job, so what is known of it stays true for as long as it is kept; whether the
//! lease is still the job's current one is for the store to say, in the call that acts
//! on it.
//!
//! Every call a client makes about a job it holds (heartbeat, log, upload, commit,
//! finish) first refuses a caller that is not the lease's holder; reading the store for
//! that, once per call, was more than a third of the farm's reads of a job's row on
//! PostgreSQL (docs/benchmarks.md, "Statements a job"). Now it is read once per lease,
//! and not at all for the leases this server handed out.

use std::collections::HashMap;
use std::sync::Mutex;

/// Leases kept at most. Runs that end through this server are forgotten as they end;
/// the rest (runs taken back, or ended through another server) are forgotten all at
/// once when this many are kept, after which the store answers again.
const MAX_KEPT: usize = 16_384;

#[derive(Default)]
pub struct Holders {
    leases: Mutex<HashMap<String, Holding>>,
}

struct Holding {
    build: String,
    job: String,
    client_id: String,
}

impl Holders {
    /// Records that `lease` of the job `build`/`job` was handed to `client_id`.
    pub fn handed(&self, build: &str, job: &str, lease: &str, client_id: &str) {
        let mut leases = self.leases.lock().expect("holders poisoned");
        if leases.len() >= MAX_KEPT {
            leases.clear();
        }
        leases.insert(
            lease.to_owned(),
            Holding {
                build: build.to_owned(),
                job: job.to_owned(),
                client_id: client_id.to_owned(),
            },
        );
    }

    /// Whether `client_id` is known to be the client `lease` of the job was handed to.
    /// False when that is not known (ask the store).
    pub fn is_holder(&self, build: &str, job: &str, lease: &str, client_id: &str) -> bool {
        let leases = self.leases.lock().expect("holders poisoned");
        leases.get(lease).is_some_and(|holding| {
            holding.build == build && holding.job == job && holding.client_id == client_id
        })
    }

    /// Forgets `lease`: its run ended.
    pub fn ended(&self, lease: &str) {
        self.leases.lock().expect("holders poisoned").remove(lease);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_known_for_its_job_and_client_until_its_run_ends() {
        let holders = Holders::default();
        holders.handed("b1", "j1", "lease-1", "client-a");
        assert!(holders.is_holder("b1", "j1", "lease-1", "client-a"));
        assert!(!holders.is_holder("b1", "j1", "lease-1", "client-b"));
        assert!(!holders.is_holder("b1", "j2", "lease-1", "client-a"));
        assert!(!holders.is_holder("b2", "j1", "lease-1", "client-a"));
        assert!(!holders.is_holder("b1", "j1", "lease-2", "client-a"));
        holders.ended("lease-1");
        assert!(!holders.is_holder("b1", "j1", "lease-1", "client-a"));
    }

    #[test]
    fn leases_past_the_bound_are_forgotten_not_kept() {
        let holders = Holders::default();
        for idx in 0..=MAX_KEPT {
            holders.handed("b", &format!("j{idx}"), &format!("lease-{idx}"), "c");
        }
        assert_eq!(holders.leases.lock().unwrap().len(), 1);
        assert!(holders.is_holder(
            "b",
            &format!("j{MAX_KEPT}"),
            &format!("lease-{MAX_KEPT}"),
            "c"
        ));
        assert!(!holders.is_holder("b", "j0", "lease-0", "c"));
    }
}
