//! `kiln bench chaos`: the chaos test. A build of products × configurations of small
//! deterministic image jobs runs on a farm of real processes while a driver SIGKILLs
//! random clients and the server and restarts them. Then it checks, from what the
//! server reports and independently of it:
//!
//! - every job finished, with exactly one image whose SHA-256 equals the value computed
//!   here for that job (and the downloaded bytes hash to it);
//! - replaying the event log, every transition starts from the state the job was in, no
//!   job was ever claimed while running (two live leases) and none finished twice.
//!
//! It prints the figures and exits 1 if any check fails.

use crate::farm::Farm;
use kiln_api::Operator;
use kiln_proto::api::{Event, ImageInfo, JobStatus};
use kiln_proto::state::JobState;
use rand::{Rng, SeedableRng};
use sha2::Digest;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// What the chaos run does.
pub struct Plan {
    pub products: u32,
    pub configs: u32,
    pub clients: u32,
    pub client_kills: u32,
    pub server_kills: u32,
    pub seed: Option<u64>,
}

/// Lines of the job's data file; the image is the file written twice.
const DATA_LINES: u32 = 4000;

/// The install step: a data file that depends only on the job id, then a pause so that
/// kills land mid-job.
const INSTALL: &str = "set -eu\n\
mkdir -p rootfs\n\
awk -v job=\"$KILN_JOB_ID\" -v n=4000 'BEGIN { for (i = 0; i < n; i++) printf \"%s line %d\\n\", job, i }' > rootfs/data\n\
echo '##kiln[progress major=install minor=data percent=50]'\n\
sleep 2\n";

/// The image step: the image is the data file twice.
const IMAGE: &str = "set -eu\n\
cat rootfs/data rootfs/data > \"$KILN_OUTPUT/$KILN_JOB_ID.img\"\n\
sleep 0.5\n";

/// The image a job must produce, computed here without kiln.
fn expected_sha256(job: &str) -> String {
    let mut data = String::new();
    for line in 0..DATA_LINES {
        data.push_str(&format!("{job} line {line}\n"));
    }
    let mut hasher = sha2::Sha256::new();
    hasher.update(data.as_bytes());
    hasher.update(data.as_bytes());
    hex::encode(hasher.finalize())
}

fn write_build(dir: &std::path::Path, plan: &Plan) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("install.sh"), INSTALL)?;
    std::fs::write(dir.join("image.sh"), IMAGE)?;
    let mut ids = Vec::new();
    let mut xml = String::from(
        "<SERVER>\n  <BUILDNUMBER>chaos</BUILDNUMBER>\n  <TITLE>chaos</TITLE>\n  <JOBS>\n",
    );
    for product in 0..plan.products {
        for config in 0..plan.configs {
            let id = format!("p{product}-c{config}");
            xml.push_str(&format!(
                "    <JOB ID=\"{id}\">\n      <CONFIGTYPE>C{config}</CONFIGTYPE>\n      <INSTALLSCRIPT>install.sh</INSTALLSCRIPT>\n      <IMAGESCRIPT>image.sh</IMAGESCRIPT>\n      <TIMEOUT>300</TIMEOUT>\n    </JOB>\n"
            ));
            ids.push(id);
        }
    }
    xml.push_str("  </JOBS>\n</SERVER>\n");
    std::fs::write(dir.join("relbuild.xml"), xml)?;
    Ok(ids)
}

/// Replays a build's event log; returns the violations found.
fn check_event_log(events: &[Event], job_ids: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut state: HashMap<&str, JobState> = HashMap::new();
    let mut n_finished: HashMap<&str, u32> = HashMap::new();
    let mut last_seq = 0;
    for event in events {
        if event.seq <= last_seq {
            problems.push(format!("event {} is out of order", event.seq));
        }
        last_seq = event.seq;
        let current = state.get(event.job.as_str()).copied();
        if event.from != current {
            problems.push(format!(
                "event {}: job {} went {:?} -> {} but was {:?}",
                event.seq, event.job, event.from, event.to, current
            ));
        }
        if event.to == JobState::Running && current == Some(JobState::Running) {
            problems.push(format!(
                "event {}: job {} claimed while running: two live leases",
                event.seq, event.job
            ));
        }
        if event.to == JobState::Finished {
            *n_finished.entry(event.job.as_str()).or_default() += 1;
        }
        state.insert(event.job.as_str(), event.to);
    }
    for id in job_ids {
        match n_finished.get(id.as_str()).copied().unwrap_or(0) {
            1 => {}
            n => problems.push(format!("job {id} finished {n} times")),
        }
    }
    problems
}

/// Runs the chaos test; returns whether every check passed.
pub async fn run(plan: Plan) -> anyhow::Result<bool> {
    let seed = plan.seed.unwrap_or_else(|| rand::thread_rng().gen());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let temp = tempfile::Builder::new().prefix("kiln-chaos-").tempdir()?;
    // Short leases so that what the kills leave behind is found quickly; a high attempt
    // limit because this run is about the invariants, not about giving up on a job.
    let mut farm = Farm::start(
        temp.path(),
        &[
            "--lease-secs",
            "4",
            "--heartbeat-secs",
            "1",
            "--max-attempts",
            "20",
        ],
    )
    .await?;
    let client_ids: Vec<String> = (0..plan.clients)
        .map(|idx| format!("chaos-{idx}"))
        .collect();
    let mut client_slots: Vec<usize> = Vec::new();
    for id in &client_ids {
        client_slots.push(farm.add_client(id, "*", 1)?);
    }
    let operator = Operator::with_token(&farm.url, Some(&farm.admin_token()?))?;
    let build_dir = temp.path().join("build");
    let job_ids = write_build(&build_dir, &plan)?;
    let started = tokio::time::Instant::now();
    operator
        .submit(&build_dir.join("relbuild.xml"), &build_dir)
        .await?;
    eprintln!(
        "chaos: seed {seed}, {} jobs, {} clients, farm in {}",
        job_ids.len(),
        plan.clients,
        temp.path().display()
    );

    let (mut n_client_kills, mut n_server_kills) = (0, 0);
    while n_client_kills < plan.client_kills || n_server_kills < plan.server_kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..900))).await;
        let kill_server = n_server_kills < plan.server_kills
            && (n_client_kills >= plan.client_kills || rng.gen_bool(0.25));
        if kill_server {
            farm.crash_and_restart_server().await?;
            n_server_kills += 1;
            eprintln!(
                "chaos: {:>5.1} s  server killed and restarted ({n_server_kills})",
                started.elapsed().as_secs_f64()
            );
        } else {
            let pick = rng.gen_range(0..client_ids.len());
            farm.kill_client(client_slots[pick]).await;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..800))).await;
            client_slots[pick] = farm.add_client(&client_ids[pick], "*", 1)?;
            n_client_kills += 1;
            eprintln!(
                "chaos: {:>5.1} s  client {} killed and restarted ({n_client_kills})",
                started.elapsed().as_secs_f64(),
                client_ids[pick]
            );
        }
    }
    let chaos_secs = started.elapsed().as_secs_f64();
    let jobs_at_calm: Vec<JobStatus> = operator.jobs("chaos").await?;
    let n_open_at_calm = jobs_at_calm
        .iter()
        .filter(|job| !job.state.is_final())
        .count();
    let waited = operator
        .wait_for_build("chaos", Some(Duration::from_secs(300)))
        .await;
    let total_secs = started.elapsed().as_secs_f64();

    let mut problems = Vec::new();
    if let Err(err) = &waited {
        problems.push(format!(
            "the build did not end: {}",
            kiln_proto::error_chain(err)
        ));
    }
    let jobs: Vec<JobStatus> = operator.jobs("chaos").await?;
    let n_finished = jobs
        .iter()
        .filter(|job| job.state == JobState::Finished)
        .count();
    for job in jobs.iter().filter(|job| job.state != JobState::Finished) {
        problems.push(format!(
            "job {} ended {}: {}",
            job.id,
            job.state,
            job.error.as_deref().unwrap_or("-")
        ));
    }
    let images: Vec<ImageInfo> = operator.images("chaos").await?;
    let mut images_by_job: BTreeMap<&str, Vec<&ImageInfo>> = BTreeMap::new();
    for image in &images {
        images_by_job
            .entry(image.job_id.as_str())
            .or_default()
            .push(image);
    }
    for id in &job_ids {
        let expected = expected_sha256(id);
        match images_by_job.get(id.as_str()).map(Vec::as_slice) {
            Some([image]) if image.name == format!("{id}.img") && image.sha256 == expected => {}
            Some([image]) => problems.push(format!(
                "job {id}: image {} has SHA-256 {}, expected {expected}",
                image.name, image.sha256
            )),
            other => problems.push(format!(
                "job {id}: {} images stored, expected 1",
                other.map_or(0, <[_]>::len)
            )),
        }
    }
    // The bytes themselves: download and verify every image (release checks each
    // against the server's SHA-256 and BLAKE3, which were just checked against ours).
    let release_dir = temp.path().join("release");
    if let Err(err) = kiln_release::release(&operator, "chaos", &release_dir).await {
        problems.push(format!("release failed: {}", kiln_proto::error_chain(&err)));
    }
    let events: Vec<Event> = operator.events("chaos").await?;
    problems.extend(check_event_log(&events, &job_ids));
    farm.stop().await;

    let n_claims = events.iter().filter(|e| e.to == JobState::Running).count();
    let mut requeues: BTreeMap<String, u32> = BTreeMap::new();
    for event in events
        .iter()
        .filter(|e| e.from == Some(JobState::Running) && e.to == JobState::Queued)
    {
        *requeues
            .entry(event.reason.clone().unwrap_or_default())
            .or_default() += 1;
    }
    println!("chaos: seed {seed}");
    println!("| jobs finished | client kills | server kills | chaos | total | claims | images verified | event-log violations |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {n_finished}/{} | {n_client_kills} | {n_server_kills} | {chaos_secs:.1} s | {total_secs:.1} s | {n_claims} | {}/{} | {} |",
        job_ids.len(),
        images.iter().filter(|image| image.sha256 == expected_sha256(&image.job_id)).count(),
        job_ids.len(),
        check_event_log(&events, &job_ids).len()
    );
    println!("jobs not yet ended when the chaos stopped: {n_open_at_calm}");
    for (reason, count) in &requeues {
        println!("requeued {count} times: {reason}");
    }
    if problems.is_empty() {
        println!("chaos: all checks passed");
        Ok(true)
    } else {
        for problem in &problems {
            println!("chaos: FAILED: {problem}");
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64, job: &str, from: Option<JobState>, to: JobState) -> Event {
        Event {
            seq,
            time: seq,
            build: "b".into(),
            job: job.into(),
            from,
            to,
            client_id: None,
            attempt: 0,
            reason: None,
        }
    }

    #[test]
    fn a_clean_history_passes() {
        use JobState::*;
        let events = [
            event(1, "j", None, Queued),
            event(2, "j", Some(Queued), Running),
            event(3, "j", Some(Running), Queued),
            event(4, "j", Some(Queued), Running),
            event(5, "j", Some(Running), Finished),
        ];
        assert!(check_event_log(&events, &["j".to_owned()]).is_empty());
    }

    #[test]
    fn two_live_leases_and_double_finishes_are_caught() {
        use JobState::*;
        let events = [
            event(1, "j", None, Queued),
            event(2, "j", Some(Queued), Running),
            event(3, "j", Some(Running), Running),
            event(4, "j", Some(Running), Finished),
            event(5, "j", Some(Running), Finished),
        ];
        let problems = check_event_log(&events, &["j".to_owned()]);
        assert!(
            problems.iter().any(|p| p.contains("two live leases")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("finished 2 times")),
            "{problems:?}"
        );
    }
}
