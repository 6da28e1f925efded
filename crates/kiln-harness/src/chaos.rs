//! `kiln bench chaos`: the chaos test. A build of products × configurations of small
//! deterministic image jobs runs on a farm of real processes while a driver SIGKILLs
//! random clients and the server and restarts them. With `--replicas N` (2 or more)
//! the farm is N servers on one PostgreSQL and one SeaweedFS of the run's own, the
//! clients are given every replica's URL, a random replica is killed each time, and
//! PostgreSQL itself is killed and restarted (`--database-restarts`). Then it checks,
//! from what the servers report and independently of them:
//!
//! - every job finished, with exactly one image whose SHA-256 equals the value computed
//!   here for that job (and the downloaded bytes hash to it);
//! - replaying the event log, every transition starts from the state the job was in, no
//!   job was ever claimed while running (two live leases) and none finished twice;
//! - no webhook notice (the build notifies a receiver of the run's own) arrived twice.
//!
//! It prints the figures and exits 1 if any check fails.

use crate::farm::{Farm, SharedStores};
use kiln_api::Operator;
use kiln_proto::api::{Event, ImageInfo, JobStatus};
use kiln_proto::state::JobState;
use rand::{Rng, SeedableRng};
use sha2::Digest;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the chaos run does.
pub struct Plan {
    pub products: u32,
    pub configs: u32,
    pub clients: u32,
    pub client_kills: u32,
    /// SIGKILLs of a server (a random replica when there are several), each
    /// restarted.
    pub server_kills: u32,
    /// Servers: 1 keeps the state in SQLite; 2 or more are replicas on PostgreSQL.
    pub replicas: u32,
    /// Kills and restarts of PostgreSQL (replicas only).
    pub database_restarts: u32,
    pub seed: Option<u64>,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blow {
    Client,
    Server,
    Database,
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

fn write_build(dir: &std::path::Path, plan: &Plan, notify: &str) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("install.sh"), INSTALL)?;
    std::fs::write(dir.join("image.sh"), IMAGE)?;
    let mut ids = Vec::new();
    let mut xml = format!(
        "<SERVER>\n  <BUILDNUMBER>chaos</BUILDNUMBER>\n  <TITLE>chaos</TITLE>\n  <NOTIFY>{notify}</NOTIFY>\n  <JOBS>\n",
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

/// A webhook receiver on loopback: keeps the JSON body of every notice POSTed to it
/// and answers `200`.
struct NoticeSink {
    url: String,
    notices: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl NoticeSink {
    async fn start() -> anyhow::Result<NoticeSink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/notices", listener.local_addr()?);
        let notices = Arc::new(Mutex::new(Vec::new()));
        let kept = notices.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    if let Ok(Some(body)) = read_one_post(stream).await {
                        kept.lock().expect("notices lock").push(body);
                    }
                });
            }
        });
        Ok(NoticeSink { url, notices })
    }

    fn received(&self) -> Vec<serde_json::Value> {
        self.notices.lock().expect("notices lock").clone()
    }
}

/// Reads one HTTP request with a `Content-Length` body, answers `200` and closes the
/// connection; returns the body as JSON (`None` if it is not).
async fn read_one_post(
    mut stream: tokio::net::TcpStream,
) -> std::io::Result<Option<serde_json::Value>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    let header_end = loop {
        if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        request.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&request[..header_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    while request.len() < header_end + length {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        request.extend_from_slice(&buf[..n]);
    }
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await?;
    Ok(serde_json::from_slice(&request[header_end..header_end + length]).ok())
}

/// Notices received more than once: the same event of the same job (its `seq`).
fn delivered_twice(notices: &[serde_json::Value]) -> Vec<String> {
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for notice in notices {
        let key = format!(
            "{} of job {} (event {})",
            notice["event"].as_str().unwrap_or("?"),
            notice["job"].as_str().unwrap_or("-"),
            notice["seq"]
        );
        *seen.entry(key).or_default() += 1;
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(key, n)| format!("notice {key} delivered {n} times"))
        .collect()
}

/// Starts the farm the plan asks for: one server on SQLite, or replicas on a
/// PostgreSQL and a SeaweedFS started here.
async fn start_farm(
    dir: &std::path::Path,
    plan: &Plan,
    args: &[&str],
) -> anyhow::Result<(Farm, Option<SharedStores>)> {
    if plan.replicas < 2 {
        return Ok((Farm::start(dir, args).await?, None));
    }
    let (farm, shared) =
        Farm::start_replicas_on_shared_stores(dir, plan.replicas, None, args).await?;
    Ok((farm, Some(shared)))
}

/// Runs the chaos test; returns whether every check passed.
pub async fn run(plan: Plan) -> anyhow::Result<bool> {
    anyhow::ensure!(
        plan.database_restarts == 0 || plan.replicas >= 2,
        "--database-restarts needs --replicas 2 or more (one server keeps its state in SQLite)"
    );
    let seed = plan.seed.unwrap_or_else(|| rand::thread_rng().gen());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let temp = tempfile::Builder::new().prefix("kiln-chaos-").tempdir()?;
    // Short leases so that what the kills leave behind is found quickly; a high attempt
    // limit because this run is about the invariants, not about giving up on a job.
    let (mut farm, shared) = start_farm(
        temp.path(),
        &plan,
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
    let sink = NoticeSink::start().await?;
    let client_ids: Vec<String> = (0..plan.clients)
        .map(|idx| format!("chaos-{idx}"))
        .collect();
    let mut client_slots: Vec<usize> = Vec::new();
    for id in &client_ids {
        client_slots.push(farm.add_client(id, "*", 1)?);
    }
    let operator = Operator::with_token(&farm.url, Some(&farm.admin_token()?))?;
    let build_dir = temp.path().join("build");
    let job_ids = write_build(&build_dir, &plan, &sink.url)?;
    let started = tokio::time::Instant::now();
    operator
        .submit(&build_dir.join("relbuild.xml"), &build_dir)
        .await?;
    eprintln!(
        "chaos: seed {seed}, {} jobs, {} clients, {} server(s){}, farm in {}",
        job_ids.len(),
        plan.clients,
        farm.n_servers(),
        if shared.is_some() {
            " on PostgreSQL and SeaweedFS"
        } else {
            ""
        },
        temp.path().display()
    );

    let mut blows: Vec<Blow> = std::iter::repeat_n(Blow::Client, plan.client_kills as usize)
        .chain(std::iter::repeat_n(
            Blow::Server,
            plan.server_kills as usize,
        ))
        .chain(std::iter::repeat_n(
            Blow::Database,
            plan.database_restarts as usize,
        ))
        .collect();
    rand::seq::SliceRandom::shuffle(blows.as_mut_slice(), &mut rng);
    let (mut n_client_kills, mut n_server_kills, mut n_database_restarts) = (0, 0, 0);
    for blow in blows {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..900))).await;
        let at = started.elapsed().as_secs_f64();
        match blow {
            Blow::Server => {
                let idx = rng.gen_range(0..farm.n_servers());
                farm.crash_and_restart_replica(idx).await?;
                n_server_kills += 1;
                eprintln!(
                    "chaos: {at:>5.1} s  server {idx} killed and restarted ({n_server_kills})"
                );
            }
            Blow::Database => {
                let postgres = shared
                    .as_ref()
                    .and_then(|shared| shared.postgres.clone())
                    .expect("replicas have a PostgreSQL of their own");
                let down_for = Duration::from_millis(rng.gen_range(500..2000));
                tokio::task::spawn_blocking(move || {
                    postgres.kill()?;
                    std::thread::sleep(down_for);
                    postgres.restart()
                })
                .await??;
                n_database_restarts += 1;
                eprintln!(
                    "chaos: {at:>5.1} s  PostgreSQL killed, restarted after {down_for:?} ({n_database_restarts})"
                );
            }
            Blow::Client => {
                let pick = rng.gen_range(0..client_ids.len());
                farm.kill_client(client_slots[pick]).await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..800))).await;
                client_slots[pick] = farm.add_client(&client_ids[pick], "*", 1)?;
                n_client_kills += 1;
                eprintln!(
                    "chaos: {at:>5.1} s  client {} killed and restarted ({n_client_kills})",
                    client_ids[pick]
                );
            }
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
    // A job's notice and the build's goes out within a moment of the build's end.
    let n_expected_notices = job_ids.len() + 1;
    let give_notices_until = tokio::time::Instant::now() + Duration::from_secs(10);
    while sink.received().len() < n_expected_notices
        && tokio::time::Instant::now() < give_notices_until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let notices = sink.received();
    let twice = delivered_twice(&notices);
    problems.extend(twice.iter().cloned());
    farm.stop().await;
    drop(shared);

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
    println!("| jobs finished | client kills | server kills | database restarts | chaos | total | claims | images verified | event-log violations | notices received | notices received twice |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {n_finished}/{} | {n_client_kills} | {n_server_kills} | {n_database_restarts} | {chaos_secs:.1} s | {total_secs:.1} s | {n_claims} | {}/{} | {} | {}/{n_expected_notices} | {} |",
        job_ids.len(),
        images.iter().filter(|image| image.sha256 == expected_sha256(&image.job_id)).count(),
        job_ids.len(),
        check_event_log(&events, &job_ids).len(),
        notices.len(),
        twice.len()
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

    #[test]
    fn a_notice_received_twice_is_caught_and_distinct_ones_are_not() {
        let notice = |event: &str, job: &str, seq: i64| serde_json::json!({ "event": event, "build": "chaos", "job": job, "seq": seq });
        let notices = [
            notice("job_finished", "a", 3),
            notice("job_finished", "b", 4),
            notice("build_finished", "", 5),
        ];
        assert!(delivered_twice(&notices).is_empty());
        let again = [notices.as_slice(), &[notice("job_finished", "a", 3)]].concat();
        assert_eq!(
            delivered_twice(&again),
            ["notice job_finished of job a (event 3) delivered 2 times"]
        );
    }
}
