//! What only the SQLite store has: its migrations. A database made by an older server
//! opens and is upgraded in place, and the migrations that existing databases recorded
//! keep their checksums. The behaviour every backend shares is in `conformance.rs`.

use kiln_store::conformance::{at, client_record, image, tally};
use kiln_store::{ClaimingClient, Images, Queue, SqliteStore};
use std::path::{Path, PathBuf};

fn migrations_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite")
}

/// Each migration's SHA-384 as the databases that applied it recorded it (sqlx checks
/// them at every open): a migration edited after its release, moved into another
/// directory with other bytes, or checked out with other line endings would make every
/// existing data directory refuse to open.
const RECORDED_CHECKSUMS: [(i64, &str); 10] = [
    (1, "064340ad3f39e9a8d607f43bcbc0ac9b702063f319ea69da49e46b5b4bc81a10dd6469138e2182d30fe5107ce7ac00ea"),
    (2, "240db48f72331136a33ea491cc892fe0a04a6ff11a3a5792696a96e59499803cabb43030a1e2563930bf2beb99bd7183"),
    (3, "0871dccc49ac71bc64ad92653002b486861355560a20a3748cc690544fda6b0d46fb280c30a4cc0bf89c8538858c24f3"),
    (4, "48b6239428f3782459ae6a7bae8503f3a0c4b0a3ac307d7a2d6114da08851224e989d1ea556db34e39e9e2801907bd9d"),
    (5, "66919413b1f05ac73f53c0949148082498076c098ba4e22168285df5f5534ae22335dc53ed6078c344d13b79fe48dd6f"),
    (6, "f6df2e19a191338127bca94ff5e09f35b999c84fa30ba0e1a33f1229ee7b19676994a596cc04b0645a9f63a4608eee8b"),
    (7, "bebbf2149206768269716ad650f875d07fdd591643c2a5e69737a2b36cdfa2fa985e2c0a925185fda3c60a0c37a611c1"),
    (8, "8ea0cdcfcb62dcb8643155c330967e5af381cb5cb55fec63f5e43775402c21d81a4bc67b6cfe32fc6916eca58dfc6311"),
    (9, "bce670031878cb1a8e56770b392f5ee414fb250bec6131519f392f897d84fae70cf9a175c4864a74dab5e8f4f0b1e954"),
    (10, "c3b159e496ba074a7703375871a972ca52d7dc1bc734db916f6af1b56c1361dfd631aef4307cc6f775199f26c5db2b2d"),
];

#[tokio::test]
async fn released_migrations_keep_the_checksums_existing_databases_recorded() -> anyhow::Result<()>
{
    let migrator = sqlx::migrate::Migrator::new(migrations_dir().as_path()).await?;
    let released: Vec<(i64, String)> = migrator
        .iter()
        .filter(|migration| {
            RECORDED_CHECKSUMS
                .iter()
                .any(|(version, _)| *version == migration.version)
        })
        .map(|migration| (migration.version, hex::encode(&migration.checksum)))
        .collect();
    let recorded: Vec<(i64, String)> = RECORDED_CHECKSUMS
        .iter()
        .map(|(version, checksum)| (*version, checksum.to_string()))
        .collect();
    assert_eq!(released, recorded);
    Ok(())
}

#[tokio::test]
async fn upgrading_a_database_gives_the_holders_of_running_jobs_a_record_that_counts_their_end(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A database as it was before clients were recorded, with one job running.
    let (path, pool, applied) = database_from_before(dir.path(), "0003").await?;
    assert_eq!(applied, 2);
    sqlx::query(
        "INSERT INTO builds (number, title, manifest, files_key, files_size, submitted_at) \
         VALUES ('7', 'old', '{}', 'k', 0, 1)",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO jobs (build, id, title, config_type, install_script, image_script, \
         timeout_secs, priority, max_attempts, retries, state, client_id, lease_token, \
         lease_expires_at, attempt, time_start) \
         VALUES ('7', 'a', 'a', 'PRO', 'i.sh', 'm.sh', 60, 0, 3, 0, 'running', 'old-client', \
         'lease-a', ?, 1, ?)",
    )
    .bind(at(600))
    .bind(at(3))
    .execute(&pool)
    .await?;
    pool.close().await;

    let store = SqliteStore::open(&path).await?;
    let record = client_record(&store, "old-client").await?;
    assert_eq!(tally(&record), (1, 0, 0, 0));
    assert_eq!((record.first_seen, record.last_contact), (at(3), at(3)));
    assert!(record.include.is_empty(), "not known until its next claim");
    assert_eq!(record.held.len(), 1);
    store
        .add_image("7", "a", "lease-a", &image("disk.wim", at(4)))
        .await?;
    store
        .finish("7", "a", "lease-a", &["disk.wim".to_owned()], at(5))
        .await?;
    let record = client_record(&store, "old-client").await?;
    assert_eq!(tally(&record), (1, 1, 0, 0));
    assert_eq!(record.image_bytes, 1 << 20);
    Ok(())
}

/// A database at `DIR/kiln.db` as a server made it before the migration named
/// `first_left_out` (every migration sorting before it applied), open on a pool for the
/// test to put rows in; and the number of migrations applied.
async fn database_from_before(
    dir: &Path,
    first_left_out: &str,
) -> anyhow::Result<(PathBuf, sqlx::SqlitePool, usize)> {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
    let path = dir.join("kiln.db");
    let old_migrations = dir.join("old-migrations");
    std::fs::create_dir(&old_migrations)?;
    let migrations = migrations_dir();
    for entry in std::fs::read_dir(&migrations)? {
        let name = entry?.file_name();
        if name.to_string_lossy().as_ref() < first_left_out {
            std::fs::copy(migrations.join(&name), old_migrations.join(&name))?;
        }
    }
    let pool = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true),
    )
    .await?;
    let migrator = sqlx::migrate::Migrator::new(old_migrations.as_path()).await?;
    migrator.run(&pool).await?;
    Ok((path, pool, migrator.iter().count()))
}

#[tokio::test]
async fn jobs_queued_before_verify_steps_existed_are_claimed_with_none() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A database as it was before migration 0006, with one job queued.
    let (path, pool, applied) = database_from_before(dir.path(), "0006").await?;
    assert_eq!(applied, 5);
    sqlx::query(
        "INSERT INTO builds (number, title, manifest, files_key, files_size, submitted_at) \
         VALUES ('8', 'old', '{}', 'k', 0, 1)",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO jobs (build, id, title, config_type, install_script, configure_script, \
         image_script, timeout_secs, priority, max_attempts, retries, state) \
         VALUES ('8', 'a', 'a', 'PRO', 'i.sh', 'c.sh', 'm.sh', 60, 0, 3, 0, 'queued')",
    )
    .execute(&pool)
    .await?;
    pool.close().await;

    let store = SqliteStore::open(&path).await?;
    let claimed = store
        .claim("8", "a", &ClaimingClient::with_id("c1"), at(60), at(2))
        .await?
        .expect("the old job is claimable");
    assert_eq!(
        (
            claimed.install_script.as_str(),
            claimed.configure_script.as_deref(),
            claimed.image_script.as_str(),
            claimed.verify_script.as_deref()
        ),
        ("i.sh", Some("c.sh"), "m.sh", None)
    );
    Ok(())
}

/// A tmpfs of `size` mounted on `path` for one test, unmounted when dropped. Mounting
/// needs root, as CI has; without it the test fails and says so.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> anyhow::Result<Self> {
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "mounting a tmpfs for the test (it needs root): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(Tmpfs(path.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A commit that fails because the disk is full leaves no transaction open on the
/// writer's connection: once space is back, every write succeeds again. (A connection
/// whose COMMIT failed once went back to sqlx's pool still counting an open
/// transaction, and every later write on it failed with "attempted to call begin_with
/// at non-zero transaction depth" until the server restarted; the writer thread rolls
/// back whatever a failed COMMIT left open.)
#[tokio::test]
async fn writes_succeed_again_once_a_full_disk_has_space() -> anyhow::Result<()> {
    use kiln_proto::api::NewLogLine;
    use kiln_store::conformance::{claim, job, new_build};
    use kiln_store::Logs;
    use std::io::Write;

    let dir = tempfile::tempdir()?;
    let _mount = Tmpfs::mount(dir.path(), "16m")?;
    let store = SqliteStore::open(&dir.path().join("kiln.db")).await?;
    store
        .insert_build(&new_build("1", vec![job("a")], at(0)))
        .await?;
    let lease = claim(&store, "1", "a", "c1", at(1)).await?.lease;
    // 256 KiB of log a batch: small enough to stay in SQLite's page cache until COMMIT,
    // so that the disk fills while the WAL is written at commit.
    let batch: Vec<NewLogLine> = (0..256)
        .map(|i| NewLogLine {
            stream: "stdout".to_owned(),
            text: format!("{i:04} {}", "x".repeat(1019)),
        })
        .collect();

    // Fill the file system, leaving about 1 MiB free, then log until it is full.
    let filler_path = dir.path().join("filler");
    let mut filler = std::fs::File::create(&filler_path)?;
    let block = vec![0x5a_u8; 64 << 10];
    while fs_free_bytes(dir.path())? > 1 << 20 {
        if filler.write_all(&block).is_err() {
            break;
        }
    }
    filler.sync_all()?;
    let mut refused = None;
    for _ in 0..64 {
        if let Err(err) = store
            .append_log("1", "a", &lease, &batch, None, at(2))
            .await
        {
            refused = Some(err);
            break;
        }
    }
    let refused = refused.ok_or_else(|| anyhow::anyhow!("the disk never filled up"))?;
    let refused = format!("{:#}", anyhow::Error::new(refused));
    assert!(
        refused.contains("full"),
        "the refusal names the full disk: {refused}"
    );

    // Space is back: every write succeeds again.
    drop(filler);
    std::fs::remove_file(&filler_path)?;
    for n in 0..24 {
        store
            .append_log("1", "a", &lease, &batch[..4], None, at(3))
            .await
            .map_err(|err| {
                anyhow::Error::new(err).context(format!("write {n} after space came back"))
            })?;
        store
            .insert_build(&new_build(&format!("after-{n}"), vec![job("a")], at(3)))
            .await
            .map_err(|err| {
                anyhow::Error::new(err).context(format!("build {n} after space came back"))
            })?;
    }
    Ok(())
}

/// Bytes free on the file system holding `path`.
fn fs_free_bytes(path: &Path) -> anyhow::Result<u64> {
    let output = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("df said {text:?}"))
}

/// A build submitted before manifests had a table of their own (migration 0013) keeps
/// its manifest, and its other columns, across the upgrade; it can still be deleted.
#[tokio::test]
async fn a_build_from_before_manifests_moved_keeps_its_manifest() -> anyhow::Result<()> {
    use kiln_store::conformance::{job, new_build};
    let dir = tempfile::tempdir()?;
    let (path, pool, applied) = database_from_before(dir.path(), "0013").await?;
    assert_eq!(applied, 12);
    let build = new_build("9", vec![job("a")], at(1));
    sqlx::query(
        "INSERT INTO builds (number, title, manifest, files_key, files_size, submitted_at) \
         VALUES ('9', 'old', ?, 'files/9.tar', 4096, ?)",
    )
    .bind(serde_json::to_string(&build.manifest)?)
    .bind(at(1))
    .execute(&pool)
    .await?;
    pool.close().await;

    let store = SqliteStore::open(&path).await?;
    let record = store.get_build("9").await?;
    assert_eq!(record.manifest, build.manifest);
    assert_eq!(
        (
            record.files_key.as_str(),
            record.files_size,
            record.submitted_at
        ),
        ("files/9.tar", 4096, at(1))
    );
    assert_eq!(
        store.build_files("9").await?,
        ("files/9.tar".to_owned(), 4096)
    );
    store.delete_build("9").await?;
    assert!(store.get_build("9").await.is_err());
    Ok(())
}
