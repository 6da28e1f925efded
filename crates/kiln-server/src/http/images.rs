//! Images: the chunked transfer (`chunks/missing`, `chunks`, `commit`), the older
//! whole-image upload, and image downloads (whole, by range, by chunk).

use super::error::HttpError;
use super::{lease_of, Doc, Shared};
use crate::domain::{Caller, FarmError};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Query, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_proto::api::ImageInfo;
use kiln_proto::transfer::{
    unpack_chunk_list, CommitRequest, FetchRequest, ImageIndex, MissingRequest, MissingResponse,
    PutChunksResponse, CHUNK_LIST_CONTENT_TYPE, FRAMES_CONTENT_TYPE, PACKED_ENTRY_BYTES,
};
use serde::Deserialize;
use std::ops::Range;
use utoipa::IntoParams;

type Answer<T> = Result<T, HttpError>;

/// Where the chunks of a packed `chunks/missing` question belong (a JSON question
/// carries these in its body).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MissingQuery {
    /// With a packed list: the image the chunks belong to.
    image: Option<String>,
    /// With a packed list: where in the image the first chunk starts.
    #[serde(default)]
    offset: u64,
}

/// `POST /v1/jobs/{build}/{job}/chunks/missing`: the chunks as JSON or as a packed list.
pub async fn missing(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    Query(query): Query<MissingQuery>,
    request: Request,
) -> Result<Json<MissingResponse>, Response> {
    let lease = lease_of(request.headers())
        .map(str::to_owned)
        .map_err(IntoResponse::into_response)?;
    let packed = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes() == CHUNK_LIST_CONTENT_TYPE.as_bytes());
    let question = if packed {
        let body = Bytes::from_request(request, &())
            .await
            .map_err(IntoResponse::into_response)?;
        let chunks = unpack_chunk_list(&body).ok_or_else(|| {
            HttpError(FarmError::invalid(
                "bad_chunk_list",
                format!(
                    "a packed chunk list of {} bytes is not a whole number of \
                     {PACKED_ENTRY_BYTES}-byte entries",
                    body.len()
                ),
            ))
            .into_response()
        })?;
        MissingRequest {
            chunks,
            image: query.image,
            offset: query.offset,
        }
    } else {
        let Json(question) = Json::<MissingRequest>::from_request(request, &())
            .await
            .map_err(IntoResponse::into_response)?;
        question
    };
    let answer = state
        .farm
        .missing_chunks(&build, &job, &lease, &question)
        .await
        .map_err(|err| HttpError(err).into_response())?;
    Ok(Json(answer))
}

pub fn missing_doc() -> Doc {
    Doc::new(
        "images",
        "missing_chunks",
        "Which chunks of an image the server lacks",
    )
    .describe(
        "The image's next chunks in order (at most 4096), repeats included: as JSON, or \
             packed (`application/x-kiln-chunk-list`: 36 bytes a chunk, its BLAKE3 raw and \
             its length as a u32 little-endian; `image` and `offset` then in the query). \
             With `image` and `offset`, the server hashes the image in order as its chunks \
             become present. Chunks asked about are kept for the upload in progress.",
    )
    .query::<MissingQuery>()
    .takes::<MissingRequest>()
    .or_takes_bytes(
        CHUNK_LIST_CONTENT_TYPE,
        "The chunks packed, 36 bytes each, back to back.",
    )
    .answers::<MissingResponse>(
        200,
        "The chunks the server lacks, in the order asked, each once.",
    )
    .refuses(400, &["bad_name", "bad_chunk_list"])
    .refuses(413, &["too_large"])
    .refuses(503, &["store_unavailable"])
}

/// `POST /v1/jobs/{build}/{job}/chunks`: a body of frames.
pub async fn put_chunks(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Answer<Json<PutChunksResponse>> {
    let lease = lease_of(&headers)?;
    Ok(Json(
        state
            .farm
            .put_chunks(&build, &job, lease, body.into_data_stream())
            .await?,
    ))
}

pub fn put_chunks_doc() -> Doc {
    Doc::new("images", "put_chunks", "Send chunks")
        .describe(
            "A body of frames, back to back. A frame is one chunk: its BLAKE3 (32 bytes, \
             raw), its raw length (u32 little-endian, 1 to 1 MiB), an encoding byte (0: the \
             data is the chunk; 1: one zstd frame), the data length (u32 little-endian) and \
             the data. Each frame is checked against its name before it is stored; the \
             first bad one ends the request (the frames before it are kept).",
        )
        .takes_bytes(FRAMES_CONTENT_TYPE, "Chunk frames, back to back.")
        .answers::<PutChunksResponse>(200, "The frames are checked and durably stored.")
        .refuses(400, &["upload_interrupted"])
        .refuses(422, &["chunk_mismatch"])
        .refuses(429, &["too_many_uploads"])
        .refuses(503, &["store_unavailable"])
        .refuses(503, &["store_unavailable"])
        .refuses(507, &["no_space"])
}

/// `POST /v1/jobs/{build}/{job}/images/{name}/commit`
pub async fn commit(
    state: Shared,
    _caller: Caller,
    Path((build, job, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    Json(request): Json<CommitRequest>,
) -> Answer<(StatusCode, Json<ImageInfo>)> {
    let lease = lease_of(&headers)?;
    let info = state
        .farm
        .commit_image(&build, &job, lease, &name, request)
        .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub fn commit_doc() -> Doc {
    Doc::new(
        "images",
        "commit_image",
        "Record an image made of stored chunks",
    )
    .describe(
        "Checks the chunk list, the chunks' presence and the whole image's BLAKE3 and \
             SHA-256, then records the image under the lease (replacing one of the same \
             name). On `missing_chunks`, send the chunks named and commit again. With \
             `announced_chunks` instead of `chunks`, the chunk list is the one the \
             image's `chunks/missing` questions named; on `chunk_list_needed`, commit \
             again with `chunks`.",
    )
    .takes::<CommitRequest>()
    .answers::<ImageInfo>(201, "The image is stored.")
    .refuses(400, &["bad_chunk"])
    .refuses(409, &["missing_chunks", "chunk_list_needed"])
    .refuses(413, &["too_large"])
    .refuses(422, &["hash_mismatch", "size_mismatch"])
    .refuses(503, &["store_unavailable"])
    .refuses(507, &["no_space"])
}

/// `PUT /v1/jobs/{build}/{job}/images/{name}`: an image whole, its BLAKE3 in a header.
pub async fn put_whole(
    state: Shared,
    _caller: Caller,
    Path((build, job, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Answer<(StatusCode, Json<ImageInfo>)> {
    let lease = lease_of(&headers)?;
    let expected = headers
        .get(kiln_proto::BLAKE3_HEADER)
        .and_then(|value| value.to_str().ok());
    let info = state
        .farm
        .put_whole_image(
            &build,
            &job,
            lease,
            &name,
            expected,
            body.into_data_stream(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub fn put_whole_doc() -> Doc {
    Doc::new("images", "put_image", "Upload an image whole")
        .describe(
            "The server checks the lease before reading the body, hashes the bytes as they \
             arrive and stores them (cut into chunks) only if their BLAKE3 is the one in \
             `x-kiln-blake3`. The same name again under the same lease replaces it.",
        )
        .digest_header(
            kiln_proto::BLAKE3_HEADER,
            "The image's BLAKE3, 64 lowercase hex digits.",
        )
        .takes_bytes("application/octet-stream", "The image's bytes.")
        .answers::<ImageInfo>(201, "The image is stored.")
        .refuses(400, &["no_hash", "hash_mismatch", "upload_interrupted"])
        .refuses(413, &["too_large"])
        .refuses(429, &["too_many_uploads"])
        .refuses(503, &["store_unavailable"])
        .refuses(503, &["store_unavailable"])
        .refuses(507, &["no_space"])
}

/// `GET /v1/jobs/{build}/{job}/images/{name}/index`
pub async fn index(
    state: Shared,
    _caller: Caller,
    Path((build, job, name)): Path<(String, String, String)>,
) -> Answer<Json<ImageIndex>> {
    Ok(Json(state.farm.image_index(&build, &job, &name).await?))
}

pub fn index_doc() -> Doc {
    Doc::new("images", "get_image_index", "The image's chunk list")
        .answers::<ImageIndex>(200, "The image's digests and its chunks in order.")
        .refuses(404, &["not_found"])
}

/// `GET /v1/jobs/{build}/{job}/images/{name}`: the whole image, or one range of it,
/// streamed from its chunks.
pub async fn download(
    state: Shared,
    _caller: Caller,
    Path((build, job, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Answer<Response> {
    let image = state.farm.image(&build, &job, &name).await?;
    let etag = format!("\"{}\"", image.info.blake3);
    let farm = &state.farm;
    Ok(ranged(&headers, image.info.size, &etag, &name)
        .answer(|span| farm.read_image_span(image, span)))
}

pub fn download_doc() -> Doc {
    Doc::new("images", "download_image", "Download an image")
        .describe(
            "The image's bytes, streamed from its chunks (each checked against its name as \
             it is read). Only images of finished jobs are served.",
        )
        .ranged()
        .answers_ranged("the image")
        .refuses(404, &["not_found"])
        .refuses(500, &["damaged_chunk"])
        .refuses(503, &["store_unavailable"])
}

/// `POST /v1/chunks/fetch`: the frames of the chunks asked for, in that order.
pub async fn fetch(
    state: Shared,
    _caller: Caller,
    Json(request): Json<FetchRequest>,
) -> Answer<Response> {
    let frames = state.farm.fetch_frames(request.chunks).await?;
    Ok((
        [(header::CONTENT_TYPE, FRAMES_CONTENT_TYPE)],
        Body::from_stream(frames),
    )
        .into_response())
}

pub fn fetch_doc() -> Doc {
    Doc::new("images", "fetch_chunks", "Chunks by name, as frames")
        .describe("At most 1024 chunks; every one must be stored.")
        .takes::<FetchRequest>()
        .answers_bytes(
            200,
            FRAMES_CONTENT_TYPE,
            "One frame per chunk asked for, in that order.",
        )
        .refuses(404, &["not_found"])
        .refuses(413, &["too_large"])
        .refuses(500, &["damaged_chunk"])
        .refuses(503, &["store_unavailable"])
}

/// How to answer a GET of a stored file: the status, the headers, and which bytes
/// (none for 304 and 416).
pub struct RangedPlan {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub span: Option<Range<u64>>,
}

impl RangedPlan {
    /// The answer, with `body` (the bytes of the span) when there is a span.
    pub fn answer<S>(self, body: impl FnOnce(Range<u64>) -> S) -> Response
    where
        S: futures::Stream<Item = Result<bytes::Bytes, kiln_blob::BlobError>> + Send + 'static,
    {
        match self.span {
            Some(span) => {
                (self.status, self.headers, Body::from_stream(body(span))).into_response()
            }
            None => (self.status, self.headers).into_response(),
        }
    }
}

/// Plans the answer to a GET of a `size`-byte file whose validator is `etag`, as RFC
/// 9110 has it: `If-None-Match` (304), `Range` with `If-Range` (206, or 416 when no
/// byte of it exists), else the whole file.
pub fn ranged(headers: &HeaderMap, size: u64, etag: &str, download_name: &str) -> RangedPlan {
    let mut response_headers = HeaderMap::new();
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(value) = HeaderValue::from_str(etag) {
        response_headers.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{download_name}\"")) {
        response_headers.insert(header::CONTENT_DISPOSITION, value);
    }
    let text = |name| {
        headers
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    if text(header::IF_NONE_MATCH).is_some_and(|tags| {
        tags.split(',')
            .any(|tag| tag.trim() == etag || tag.trim() == "*")
    }) {
        return RangedPlan {
            status: StatusCode::NOT_MODIFIED,
            headers: response_headers,
            span: None,
        };
    }
    // If-Range with another validator means: send the whole (new) file.
    let range = match text(header::IF_RANGE) {
        Some(validator) if validator.trim() != etag => None,
        _ => text(header::RANGE),
    };
    let (status, span) = match parse_range(range, size) {
        Ok(Some(span)) => (StatusCode::PARTIAL_CONTENT, span),
        Ok(None) => (StatusCode::OK, 0..size),
        Err(()) => {
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response_headers.insert(header::CONTENT_RANGE, value);
            }
            return RangedPlan {
                status: StatusCode::RANGE_NOT_SATISFIABLE,
                headers: response_headers,
                span: None,
            };
        }
    };
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {}-{}/{size}", span.start, span.end - 1);
        if let Ok(value) = HeaderValue::from_str(&value) {
            response_headers.insert(header::CONTENT_RANGE, value);
        }
    }
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(span.end - span.start),
    );
    RangedPlan {
        status,
        headers: response_headers,
        span: Some(span),
    }
}

/// What a `Range` header asks of a `size`-byte file: `Ok(None)` for the whole file
/// (no header, a form not understood, or several ranges), `Err(())` when no byte of
/// it exists.
fn parse_range(value: Option<&str>, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(spec) = value.and_then(|value| value.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let span = if first.is_empty() {
        // The last N bytes.
        let Ok(suffix) = last.parse::<u64>() else {
            return Ok(None);
        };
        if suffix == 0 || size == 0 {
            return Err(());
        }
        size.saturating_sub(suffix)..size
    } else {
        let Ok(start) = first.parse::<u64>() else {
            return Ok(None);
        };
        let end = if last.is_empty() {
            size
        } else {
            match last.parse::<u64>() {
                Ok(last) if last >= start => last.saturating_add(1).min(size),
                _ => return Ok(None),
            }
        };
        if start >= size {
            return Err(());
        }
        start..end
    };
    Ok(Some(span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        let size = 1000;
        let span = |start, end| Ok(Some(start..end));
        assert_eq!(parse_range(None, size), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-99"), size), span(0, 100));
        assert_eq!(parse_range(Some("bytes=900-"), size), span(900, 1000));
        assert_eq!(parse_range(Some("bytes=-100"), size), span(900, 1000));
        assert_eq!(parse_range(Some("bytes=-5000"), size), span(0, 1000));
        assert_eq!(parse_range(Some("bytes=990-5000"), size), span(990, 1000));
        assert_eq!(parse_range(Some("bytes=1000-"), size), Err(()));
        assert_eq!(parse_range(Some("bytes=-0"), size), Err(()));
        // Several ranges, or forms not understood: the whole file.
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), size), Ok(None));
        assert_eq!(parse_range(Some("bytes=5-1"), size), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), size), Ok(None));
        assert_eq!(parse_range(Some("bytes=x-1"), size), Ok(None));
    }
}
