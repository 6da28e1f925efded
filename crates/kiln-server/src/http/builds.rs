//! Builds: submit, list, read, delete; their jobs, events, images and files.

use super::error::HttpError;
use super::images::ranged;
use super::{lease_header, xml_response, Shared};
use crate::farm::{Caller, FarmError};
use axum::extract::{Multipart, Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use kiln_proto::api::{BuildSummary, Event, ImageInfo, JobStatus, Submitted};
use kiln_proto::transfer::DeleteReport;
use serde::Deserialize;

type Answer<T> = Result<T, HttpError>;

pub async fn list(state: Shared, _caller: Caller) -> Answer<Json<Vec<BuildSummary>>> {
    Ok(Json(state.farm.builds().await?))
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
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|err| FarmError::invalid("bad_upload", format!("reading the submission: {err}")))?
    {
        match field.name().unwrap_or_default() {
            "manifest" => {
                let file_name = field.file_name().unwrap_or("relbuild.xml").to_owned();
                let bytes = field.bytes().await.map_err(|err| {
                    FarmError::invalid("bad_upload", format!("reading the manifest: {err}"))
                })?;
                manifest = Some(farm.check_manifest(&file_name, &bytes).await?);
            }
            "files" => files = Some(farm.stage_files(field).await?),
            other => {
                return Err(FarmError::invalid(
                    "bad_upload",
                    format!(
                        "unexpected part {other:?} in the submission (expected manifest and files)"
                    ),
                )
                .into());
            }
        }
    }
    let manifest = manifest
        .ok_or_else(|| FarmError::invalid("bad_upload", "the submission has no manifest part"))?;
    let files = files
        .ok_or_else(|| FarmError::invalid("bad_upload", "the submission has no files part"))?;
    let submitted = farm.submit(manifest, files).await?;
    Ok((StatusCode::CREATED, Json(submitted)))
}

pub async fn summary(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Answer<Json<BuildSummary>> {
    Ok(Json(state.farm.build(&build).await?))
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

pub async fn jobs(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Answer<Json<Vec<JobStatus>>> {
    Ok(Json(state.farm.jobs(&build).await?))
}

pub async fn relbuild_xml(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Answer<Response> {
    let manifest = state.farm.manifest(&build).await?;
    Ok(xml_response(manifest.to_relbuild_xml()))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    after: i64,
    /// Seconds to wait for a new event when there is none after `after`.
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

pub async fn images(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Answer<Json<Vec<ImageInfo>>> {
    Ok(Json(state.farm.images(&build).await?))
}

#[derive(Deserialize)]
pub struct FilesQuery {
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
