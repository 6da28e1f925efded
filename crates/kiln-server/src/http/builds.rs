//! Builds: submit, list, read, delete; their jobs, events, images and files.

use super::error::HttpError;
use super::images::ranged;
use super::{lease_header, xml_response, Doc, Shared};
use crate::domain::{Caller, FarmError};
use axum::extract::{Multipart, Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use kiln_proto::api::{BuildSummary, Event, ImageInfo, JobStatus, Submitted};
use kiln_proto::transfer::DeleteReport;
use serde::Deserialize;
use utoipa::IntoParams;

type Answer<T> = Result<T, HttpError>;

pub async fn list(state: Shared, _caller: Caller) -> Answer<Json<Vec<BuildSummary>>> {
    Ok(Json(state.farm.builds().await?))
}

pub fn list_doc() -> Doc {
    Doc::new("builds", "list_builds", "All builds")
        .answers_list::<BuildSummary>(200, "Every build, newest first.")
}

/// `POST /v1/builds`: a multipart body with the manifest, then the files archive.
pub async fn submit(
    state: Shared,
    _caller: Caller,
    mut multipart: Multipart,
) -> Answer<(StatusCode, Json<Submitted>)> {
    let farm = &state.farm;
    let mut manifest = None;
    let mut files = None;
    let mut files_begun = false;
    let read: Result<(), FarmError> = async {
        while let Some(field) = multipart.next_field().await.map_err(|err| {
            FarmError::invalid("bad_upload", format!("reading the submission: {err}"))
        })? {
            match field.name().unwrap_or_default() {
                "manifest" => {
                    let file_name = field.file_name().unwrap_or("relbuild.xml").to_owned();
                    let bytes = field.bytes().await.map_err(|err| {
                        FarmError::invalid("bad_upload", format!("reading the manifest: {err}"))
                    })?;
                    manifest = Some(farm.check_manifest(&file_name, &bytes).await?);
                }
                "files" => {
                    files_begun = true;
                    files = Some(farm.stage_files(field).await?);
                }
                other => {
                    return Err(FarmError::invalid(
                        "bad_upload",
                        format!(
                            "unexpected part {other:?} in the submission (expected manifest and files)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(err) = read {
        // Refused before the files were read (a bad manifest, say): the client is
        // still sending them. Refused in the middle of them, the rest is not read.
        if !files_begun {
            drain_rest(&mut multipart, REFUSED_DRAIN_BYTES).await;
        }
        return Err(err.into());
    }
    let manifest = manifest
        .ok_or_else(|| FarmError::invalid("bad_upload", "the submission has no manifest part"))?;
    let files = files
        .ok_or_else(|| FarmError::invalid("bad_upload", "the submission has no files part"))?;
    let submitted = farm.submit(manifest, files).await?;
    Ok((StatusCode::CREATED, Json(submitted)))
}

/// How much of a refused submission is still read, at most, before the refusal is
/// sent.
const REFUSED_DRAIN_BYTES: u64 = 64 << 20;

/// Reads and drops the rest of a submission refused before its files part, up to
/// `limit` bytes of it. A client still sending its files when the refusal is sent and
/// the connection closed would get a broken pipe instead of the refusal; past `limit`,
/// it does.
async fn drain_rest(multipart: &mut Multipart, limit: u64) {
    let mut read = 0u64;
    while let Ok(Some(mut field)) = multipart.next_field().await {
        while let Ok(Some(piece)) = field.chunk().await {
            read += piece.len() as u64;
            if read > limit {
                return;
            }
        }
    }
}

pub fn submit_doc() -> Doc {
    Doc::new("builds", "submit_build", "Submit a build")
        .describe(
            "A `multipart/form-data` body with two parts, the manifest first. Nothing of a \
             refused submission is stored.",
        )
        .takes_files(&[
            (
                "manifest",
                "The manifest (UTF-8, at most 4 MiB): the seed's relbuild.xml or kiln.toml. \
                 Its file name picks the format (.xml or .toml, else by content); errors \
                 name it.",
            ),
            (
                "files",
                "A tar archive of the build's files: regular files and directories only, \
                 paths inside the archive. Every script the manifest names must be in it.",
            ),
        ])
        .answers::<Submitted>(201, "The build is stored and its jobs are queued.")
        .refuses(
            400,
            &["bad_request", "bad_manifest", "bad_files", "bad_upload"],
        )
        .refuses(409, &["duplicate_build"])
        .refuses(413, &["too_large"])
        .refuses(503, &["store_unavailable"])
        .refuses(507, &["no_space"])
}

pub async fn summary(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Answer<Json<BuildSummary>> {
    Ok(Json(state.farm.build(&build).await?))
}

pub fn summary_doc() -> Doc {
    Doc::new("builds", "get_build", "One build's summary")
        .answers::<BuildSummary>(200, "The build's summary, with its jobs counted by state.")
        .refuses(404, &["not_found"])
}

/// `DELETE /v1/builds/{build}`: the build and everything of it, then the chunks no
/// image uses any more.
pub async fn delete(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Answer<Json<DeleteReport>> {
    Ok(Json(state.farm.delete_build(&build).await?))
}

pub fn delete_doc() -> Doc {
    Doc::new("builds", "delete_build", "Delete a build")
        .describe(
            "The build, its jobs, logs, events, files and images, then the chunks no \
             image uses any more. A build with running jobs is not deleted.",
        )
        .answers::<DeleteReport>(200, "What went.")
        .refuses(404, &["not_found"])
        .refuses(409, &["conflict"])
}

pub async fn jobs(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Answer<Json<Vec<JobStatus>>> {
    Ok(Json(state.farm.jobs(&build).await?))
}

pub fn jobs_doc() -> Doc {
    Doc::new("builds", "list_jobs", "The build's jobs")
        .answers_list::<JobStatus>(200, "The build's jobs, in manifest order.")
        .refuses(404, &["not_found"])
}

pub async fn relbuild_xml(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Answer<Response> {
    let manifest = state.farm.manifest(&build).await?;
    Ok(xml_response(manifest.to_relbuild_xml()))
}

pub fn relbuild_xml_doc() -> Doc {
    Doc::new(
        "builds",
        "get_relbuild_xml",
        "The build's manifest as the seed's XML",
    )
    .answers_text(
        200,
        "application/xml",
        "The stored manifest in the seed's relbuild.xml schema, whichever form was \
             submitted.",
    )
    .refuses(404, &["not_found"])
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The events after this sequence number (the last `seq` seen).
    #[serde(default)]
    after: i64,
    /// Seconds to wait for a new event when there is none after `after` (at most 120).
    #[serde(default)]
    wait: u64,
}

pub async fn events(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Answer<Json<Vec<Event>>> {
    Ok(Json(
        state.farm.events(&build, query.after, query.wait).await?,
    ))
}

pub fn events_doc() -> Doc {
    Doc::new("builds", "list_events", "The build's event log")
        .describe(
            "Every state change of every job of the build after `after`, oldest first. \
             Sequence numbers grow across all builds, so they have gaps within one. With \
             `wait`, the call is held until there is a new event or the wait ends (then \
             `[]`).",
        )
        .query::<EventsQuery>()
        .answers_list::<Event>(200, "The events after `after`, oldest first.")
        .refuses(404, &["not_found"])
}

pub async fn images(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Answer<Json<Vec<ImageInfo>>> {
    Ok(Json(state.farm.images(&build).await?))
}

pub fn images_doc() -> Doc {
    Doc::new("builds", "list_images", "The build's images")
        .answers_list::<ImageInfo>(200, "The images of the build's finished jobs.")
        .refuses(404, &["not_found"])
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilesQuery {
    /// The job a client fetches the files for (it presents that job's lease); the
    /// admin leaves it out.
    job: Option<String>,
}

/// The build's files archive (with Range support): for the admin, or for a client
/// holding one of its jobs.
pub async fn files(
    state: Shared,
    caller: Caller,
    Path(build): Path<String>,
    Query(query): Query<FilesQuery>,
    headers: HeaderMap,
) -> Answer<Response> {
    let farm = &state.farm;
    let files = farm
        .build_files(
            &caller,
            &build,
            query.job.as_deref(),
            lease_header(&headers),
        )
        .await?;
    let etag = format!("\"{}\"", files.key);
    let plan = ranged(&headers, files.size, &etag, &format!("{build}-files.tar"));
    let Some(span) = plan.span.clone() else {
        return Ok(plan.answer(|_| futures::stream::empty()));
    };
    let read = farm.read_files(&files, span).await?;
    Ok(plan.answer(|_| read.body))
}

pub fn files_doc() -> Doc {
    Doc::new("builds", "get_build_files", "The build's files (tar)")
        .describe(
            "The tar archive submitted with the build. The admin may fetch it any time; a \
             client adds `?job=JOB` and that job's lease in `x-kiln-lease`.",
        )
        .query::<FilesQuery>()
        .lease("A client's lease of the job named by `job`.")
        .ranged()
        .answers_ranged("the build's files archive")
        .refuses(400, &["no_job", "no_lease"])
        .refuses(404, &["not_found"])
        .refuses(409, &["stale_lease"])
        .refuses(503, &["store_unavailable"])
}
