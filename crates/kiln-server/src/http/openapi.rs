//! The API's OpenAPI 3.1 description, built from the route table.
//!
//! Every row of the table carries a [`Doc`]: the route's name and words, the query and
//! header parameters it reads, the body it takes, what it answers and the refusals of
//! its own. Everything else comes from the row itself, so that it cannot disagree with
//! what the router serves: the path and its parameters, the method, who may call it
//! (as security schemes: `admin` and `join` bearer tokens, `client` Basic), the
//! `x-kiln-lease` header of holder routes, and the refusals that its access, its path
//! parameters and a JSON body bring, and `x-kiln-route`: whether it is a long poll, its
//! body limit, whether `--public-read` opens it. A route without a description cannot
//! be written.
//!
//! Every refusal is an [`ApiError`]; the description lists, for each status of each
//! route, the codes it may carry (in words and in `x-kiln-codes`), and the meaning of
//! every code ([`CODES`]). [`document`] builds the description; `GET
//! /v1/openapi.json` serves it, and `kiln openapi` writes it to `docs/openapi.json`.

use super::{Access, BodyLimit, Endpoint};
use axum::http::{Method, StatusCode};
use kiln_proto::api::ApiError;
use serde_json::json;
use std::collections::BTreeMap;
use utoipa::openapi::content::Content;
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{
    HttpMethod, Operation, OperationBuilder, Parameter, ParameterBuilder, ParameterIn, PathItem,
};
use utoipa::openapi::request_body::{RequestBody, RequestBodyBuilder};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{
    ArrayBuilder, KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type,
};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{
    Components, InfoBuilder, LicenseBuilder, OpenApi, OpenApiBuilder, Paths, Ref, RefOr, Required,
};
use utoipa::{IntoParams, PartialSchema, ToSchema};

/// Every refusal code the API answers with: its status and what it means. A [`Doc`]
/// names codes; their words come from here.
pub const CODES: &[(u16, &str, &str)] = &[
    (400, "bad_name", "a build number, job id, image name or client id is not a safe name (1-128 of letters, digits, '.', '_', '-', starting with a letter or digit)"),
    (400, "bad_request", "the body is not JSON, or a query string or path cannot be decoded"),
    (400, "no_lease", "the call needs the job's lease token in x-kiln-lease"),
    (400, "no_hash", "an image upload without a valid x-kiln-blake3"),
    (400, "hash_mismatch", "the image's bytes do not hash to x-kiln-blake3; nothing was stored"),
    (400, "upload_interrupted", "the upload broke off"),
    (400, "bad_manifest", "the manifest cannot be parsed or breaks a rule"),
    (400, "bad_files", "the build's files archive is damaged, holds a link, a device or a path that escapes, or lacks a script the manifest names"),
    (400, "bad_upload", "the submission is not manifest + files multipart"),
    (400, "no_include", "a claim or offer with an empty include"),
    (400, "no_job", "a client fetching a build's files without ?job=ID"),
    (400, "invalid_key", "a blob key that is not 64 lowercase hex digits"),
    (400, "bad_chunk", "a commit lists a chunk of length 0 or over 1 MiB"),
    (400, "bad_chunk_list", "a packed chunk list is not a whole number of 36-byte entries"),
    (400, "bad_action", "a join-token action other than rotate or disable"),
    (401, "unauthorized", "no credential, one that is neither Bearer nor Basic, an unknown token, a wrong secret, or a revoked client"),
    (403, "forbidden", "a valid credential without the right: the wrong role for the route, a claim naming another client id, a job held by another client, a build the client runs no job of, enrolling a revoked id"),
    (404, "not_found", "no such build, job, image, chunk or credential (images of unfinished jobs are not found)"),
    (409, "stale_lease", "the lease is not the job's current one, or the job is not running: the client stops the job"),
    (409, "duplicate_build", "a build with this number exists"),
    (409, "conflict", "the job's or build's state does not allow this"),
    (409, "client_exists", "enrolling an id that has a credential already"),
    (409, "missing_chunks", "a commit lists chunks the server does not have; missing names them"),
    (409, "chunk_list_needed", "a commit refers to the chunks its questions announced, which this server does not hold (it restarted since): commit again with the list"),
    (413, "too_large", "a body, manifest, build, image, log batch or chunk list over its limit"),
    (415, "bad_content_type", "a JSON call without Content-Type: application/json"),
    (422, "bad_request", "a JSON body that does not fit the call's type"),
    (422, "chunk_mismatch", "a chunk frame whose bytes do not hash to its name, do not decode, or have the wrong length; that chunk was not stored"),
    (422, "hash_mismatch", "the chunks do not make the BLAKE3 or SHA-256 the commit announced; nothing was stored"),
    (422, "size_mismatch", "the chunks do not add up to the size the commit announced; nothing was stored"),
    (429, "too_many_uploads", "the client sends as many uploads at once as the server allows; send again after Retry-After"),
    (500, "store_failed", "the server's database failed"),
    (500, "io_failed", "the server's storage failed"),
    (500, "internal", "the server failed"),
    (500, "damaged_chunk", "a stored chunk does not hash to its name: it is never served"),
    (503, "store_unavailable", "the server cannot reach its database or its object store (down or unreachable); nothing changed; send again after Retry-After"),
    (507, "no_space", "the server's disk is full; nothing was stored"),
];

/// What each path parameter names, for its description and example.
const PATH_PARAMETERS: [(&str, &str, &str); 4] = [
    ("build", "The build number.", "4000"),
    ("job", "The job id, unique in its build.", "disk"),
    ("name", "The image's file name.", "disk.img"),
    ("client", "The client id.", "curl-1"),
];

/// A safe name, as every path parameter must be.
pub const SAFE_NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$";

/// Media type of image bytes and build files.
const BYTES: &str = "application/octet-stream";

/// What a route takes and answers, beyond what its row of the table says.
pub struct Doc {
    operation_id: &'static str,
    tag: &'static str,
    summary: &'static str,
    description: Option<&'static str>,
    parameters: Vec<Parameter>,
    body: Option<RequestBody>,
    json_body: bool,
    answers: Vec<(u16, Response)>,
    refusals: Vec<(u16, &'static str)>,
    schemas: Vec<(String, RefOr<Schema>)>,
}

impl Doc {
    /// A route named `operation_id`, grouped under `tag`, with a one-line summary.
    pub fn new(tag: &'static str, operation_id: &'static str, summary: &'static str) -> Self {
        Doc {
            operation_id,
            tag,
            summary,
            description: None,
            parameters: Vec::new(),
            body: None,
            json_body: false,
            answers: Vec::new(),
            refusals: Vec::new(),
            schemas: Vec::new(),
        }
    }

    /// More words than the summary.
    pub fn describe(mut self, description: &'static str) -> Self {
        self.description = Some(description);
        self
    }

    /// The query parameters the handler reads as `Q`.
    pub fn query<Q: IntoParams>(mut self) -> Self {
        self.parameters
            .extend(Q::into_params(|| Some(ParameterIn::Query)));
        self
    }

    /// A request header the handler reads.
    pub fn header(mut self, name: &str, required: bool, description: &str) -> Self {
        self.parameters
            .push(header_parameter(name, required, description));
        self
    }

    /// The `x-kiln-lease` header, when the route reads it without requiring it.
    pub fn lease(mut self, description: &str) -> Self {
        self.parameters.push(lease_header(false, description));
        self
    }

    /// A header that carries a BLAKE3 or SHA-256: 64 lowercase hex digits.
    pub fn digest_header(mut self, name: &str, description: &str) -> Self {
        self.parameters.push(header_parameter_of(
            name,
            true,
            description,
            ObjectBuilder::new().pattern(Some("^[0-9a-f]{64}$")),
        ));
        self
    }

    /// The request headers of a download with Range support.
    pub fn ranged(self) -> Self {
        self.header(
            "Range",
            false,
            "One byte range (`bytes=A-B`, `bytes=A-`, `bytes=-N`): answered 206. Several \
             ranges, or a form not understood, get the whole file.",
        )
        .header(
            "If-Range",
            false,
            "With Range: the ETag the range is of; another ETag gets the whole file.",
        )
        .header(
            "If-None-Match",
            false,
            "ETags (or `*`): 304 when one is the file's.",
        )
    }

    /// A JSON body of type `T`.
    pub fn takes<T: ToSchema>(mut self) -> Self {
        let schema = self.schema_of::<T>();
        self.body = Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content("application/json", Content::new(Some(schema)))
                .build(),
        );
        self.json_body = true;
        self
    }

    /// Besides the JSON body [`Doc::takes`] named, a body of bytes of `media_type`.
    pub fn or_takes_bytes(mut self, media_type: &str, description: &str) -> Self {
        if let Some(body) = self.body.as_mut() {
            body.content
                .insert(media_type.to_owned(), Content::new(Some(binary())));
            body.description = Some(description.to_owned());
        }
        self
    }

    /// A body of bytes of `media_type`.
    pub fn takes_bytes(mut self, media_type: &str, description: &str) -> Self {
        self.body = Some(
            RequestBodyBuilder::new()
                .description(Some(description))
                .required(Some(Required::True))
                .content(media_type, Content::new(Some(binary())))
                .build(),
        );
        self
    }

    /// A `multipart/form-data` body whose parts are all files (bytes), each with its
    /// words.
    pub fn takes_files(mut self, parts: &[(&str, &str)]) -> Self {
        let mut form = ObjectBuilder::new().schema_type(Type::Object);
        for (name, description) in parts {
            form = form
                .property(
                    *name,
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
                        .description(Some(*description)),
                )
                .required(*name);
        }
        self.body = Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content("multipart/form-data", Content::new(Some(form.build())))
                .build(),
        );
        self
    }

    /// An answer with a JSON body of type `T`.
    pub fn answers<T: ToSchema>(mut self, status: u16, description: &str) -> Self {
        let schema = self.schema_of::<T>();
        self.answers.push((
            status,
            ResponseBuilder::new()
                .description(description)
                .content("application/json", Content::new(Some(schema)))
                .build(),
        ));
        self
    }

    /// An answer with a JSON object that has no schema of its own.
    pub fn answers_object(mut self, status: u16, description: &str) -> Self {
        let object = ObjectBuilder::new().schema_type(Type::Object).build();
        self.answers.push((
            status,
            ResponseBuilder::new()
                .description(description)
                .content("application/json", Content::new(Some(object)))
                .build(),
        ));
        self
    }

    /// An answer without a body.
    pub fn answers_empty(mut self, status: u16, description: &str) -> Self {
        self.answers.push((
            status,
            ResponseBuilder::new().description(description).build(),
        ));
        self
    }

    /// A `text/event-stream` answer whose events are named `events`, each with its
    /// data as JSON text; the schema describes one event, as schemathesis and OpenAPI
    /// 3.2's `itemSchema` read it.
    pub fn answers_events(mut self, status: u16, events: &[&str], description: &str) -> Self {
        let string = || ObjectBuilder::new().schema_type(Type::String);
        let names: Vec<serde_json::Value> = events.iter().map(|name| json!(name)).collect();
        let event = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "event",
                string()
                    .enum_values(Some(names))
                    .description(Some("The message's kind.")),
            )
            .property(
                "data",
                string()
                    .content_media_type("application/json")
                    .description(Some("The message, as JSON.")),
            )
            .property(
                "id",
                string().description(Some(
                    "Where the stream is: send it back as `Last-Event-ID` (or `after`).",
                )),
            )
            .property(
                "retry",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .description(Some("Milliseconds to wait before reconnecting.")),
            )
            .required("event")
            .required("data")
            .build();
        self.answers.push((
            status,
            ResponseBuilder::new()
                .description(description)
                .content("text/event-stream", Content::new(Some(event)))
                .build(),
        ));
        self
    }

    /// An answer whose body is text of `media_type`.
    pub fn answers_text(mut self, status: u16, media_type: &str, description: &str) -> Self {
        let text = ObjectBuilder::new().schema_type(Type::String).build();
        self.answers.push((
            status,
            ResponseBuilder::new()
                .description(description)
                .content(media_type, Content::new(Some(text)))
                .build(),
        ));
        self
    }

    /// An answer whose body is bytes of `media_type`.
    pub fn answers_bytes(mut self, status: u16, media_type: &str, description: &str) -> Self {
        self.answers.push((
            status,
            ResponseBuilder::new()
                .description(description)
                .content(media_type, Content::new(Some(binary())))
                .build(),
        ));
        self
    }

    /// The answers of a download with Range support, and the headers they carry.
    pub fn answers_ranged(mut self, what: &str) -> Self {
        let string = || ObjectBuilder::new().schema_type(Type::String).build();
        let header = |description: &str| {
            HeaderBuilder::new()
                .schema(string())
                .description(Some(description))
                .build()
        };
        let etag = || header("The file's BLAKE3 in quotes.");
        let with_common = |response: ResponseBuilder| {
            response
                .header("ETag", etag())
                .header("Accept-Ranges", header("`bytes`."))
                .header(
                    "Content-Disposition",
                    header("`attachment; filename=\"NAME\"`."),
                )
        };
        self.answers.push((
            200,
            with_common(ResponseBuilder::new().description(format!("{what}, whole.")))
                .content(BYTES, Content::new(Some(binary())))
                .build(),
        ));
        self.answers.push((
            206,
            with_common(ResponseBuilder::new().description(format!("One range of {what}.")))
                .header("Content-Range", header("`bytes A-B/SIZE`."))
                .content(BYTES, Content::new(Some(binary())))
                .build(),
        ));
        self.answers.push((
            304,
            with_common(ResponseBuilder::new().description("If-None-Match names the file's ETag."))
                .build(),
        ));
        self.answers.push((
            416,
            ResponseBuilder::new()
                .description("No byte of the range exists.")
                .header("Content-Range", header("`bytes */SIZE`."))
                .build(),
        ));
        self
    }

    /// Refusals of this route beyond those its row brings, by status and code.
    pub fn refuses(mut self, status: u16, codes: &[&'static str]) -> Self {
        self.refusals
            .extend(codes.iter().map(|code| (status, *code)));
        self
    }

    /// An answer with a JSON list of `T`.
    pub fn answers_list<T: ToSchema>(mut self, status: u16, description: &str) -> Self {
        let items = self.schema_of::<T>();
        let list = ArrayBuilder::new().items(items).build();
        self.answers.push((
            status,
            ResponseBuilder::new()
                .description(description)
                .content("application/json", Content::new(Some(list)))
                .build(),
        ));
        self
    }

    /// A reference to `T`'s schema, noting it and the schemas it uses for the
    /// document's components.
    fn schema_of<T: ToSchema>(&mut self) -> RefOr<Schema> {
        self.schemas.push((T::name().into_owned(), T::schema()));
        T::schemas(&mut self.schemas);
        RefOr::Ref(Ref::from_schema_name(T::name()))
    }
}

/// A schema of raw bytes.
fn binary() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
        .build()
        .into()
}

fn header_parameter(name: &str, required: bool, description: &str) -> Parameter {
    header_parameter_of(name, required, description, ObjectBuilder::new())
}

/// A header parameter whose value `schema` (a string) describes further.
fn header_parameter_of(
    name: &str,
    required: bool,
    description: &str,
    schema: ObjectBuilder,
) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Header)
        .required(if required {
            Required::True
        } else {
            Required::False
        })
        .description(Some(description))
        .schema(Some(schema.schema_type(Type::String).build()))
        .build()
}

/// The `x-kiln-lease` header: an empty one is no lease at all.
fn lease_header(required: bool, description: &str) -> Parameter {
    header_parameter_of(
        kiln_proto::LEASE_HEADER,
        required,
        description,
        ObjectBuilder::new().min_length(Some(1)),
    )
}

/// A route as the description has it: its row and its doc.
pub(super) struct Described<'a> {
    pub endpoint: &'a Endpoint,
    pub doc: &'a Doc,
}

/// The names of the security schemes, as the description's `components` has them.
pub const ADMIN_SCHEME: &str = "admin";
pub const JOIN_SCHEME: &str = "join";
pub const CLIENT_SCHEME: &str = "client";

/// The credentials that may call a route of `access`: one requirement each (any one
/// suffices); an empty requirement means anyone.
pub fn security_of(access: Access) -> Vec<Vec<&'static str>> {
    match access {
        Access::Open => vec![vec![]],
        Access::AnyCredential => vec![vec![ADMIN_SCHEME], vec![JOIN_SCHEME], vec![CLIENT_SCHEME]],
        Access::Read { .. } => vec![vec![ADMIN_SCHEME], vec![CLIENT_SCHEME]],
        Access::Admin => vec![vec![ADMIN_SCHEME]],
        Access::Client | Access::Holder => vec![vec![CLIENT_SCHEME]],
        Access::Enroll => vec![vec![JOIN_SCHEME], vec![ADMIN_SCHEME]],
    }
}

/// Who may call, in the words of docs/api.md.
fn access_words(access: Access) -> &'static str {
    match access {
        Access::Open => "anyone, without a credential",
        Access::AnyCredential => "any valid credential",
        Access::Read { public: true } => {
            "the admin, or a client that runs a job of the build; anyone when the server \
             serves reads publicly (--public-read)"
        }
        Access::Read { public: false } => "the admin, or a client that runs a job of the build",
        Access::Admin => "the admin",
        Access::Client => "a client, naming itself",
        Access::Holder => "the client holding the job, with its lease",
        Access::Enroll => "the join token (or the admin)",
    }
}

/// The path parameters of `path`, in order.
fn path_parameter_names(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

/// The refusals a route's row brings, whatever its doc says.
fn row_refusals(endpoint: &Endpoint, doc: &Doc) -> Vec<(u16, &'static str)> {
    let mut refusals = Vec::new();
    if !path_parameter_names(endpoint.path).is_empty() {
        refusals.push((400, "bad_name"));
    }
    match endpoint.access {
        Access::Open => {}
        Access::AnyCredential => refusals.push((401, "unauthorized")),
        Access::Read { .. } | Access::Admin | Access::Client | Access::Enroll => {
            refusals.extend([(401, "unauthorized"), (403, "forbidden")])
        }
        Access::Holder => refusals.extend([
            (401, "unauthorized"),
            (403, "forbidden"),
            (400, "no_lease"),
            (404, "not_found"),
            (409, "stale_lease"),
        ]),
    }
    if doc.json_body {
        refusals.extend([
            (400, "bad_request"),
            (413, "too_large"),
            (415, "bad_content_type"),
            (422, "bad_request"),
        ]);
    }
    if doc
        .parameters
        .iter()
        .any(|parameter| parameter.parameter_in == ParameterIn::Query)
    {
        refusals.push((400, "bad_request"));
    }
    refusals.extend([
        (500, "store_failed"),
        (500, "io_failed"),
        (500, "internal"),
        (503, "store_unavailable"),
    ]);
    refusals
}

/// The table of refusal codes, for the description's words.
fn codes_table() -> String {
    let mut table = String::from("| Status | code | Meaning |\n| --- | --- | --- |\n");
    for (status, code, meaning) in CODES {
        table.push_str(&format!("| {status} | `{code}` | {meaning} |\n"));
    }
    table
}

/// The meaning of `code` answered with `status`.
///
/// # Panics
/// When [`CODES`] does not list it: a doc names a code nobody described.
fn meaning(status: u16, code: &str) -> &'static str {
    CODES
        .iter()
        .find(|(each_status, each_code, _)| *each_status == status && *each_code == code)
        .map(|(_, _, meaning)| *meaning)
        .unwrap_or_else(|| panic!("refusal {status} {code} is not in the table of codes"))
}

/// The answer of a refusal with `status` and these `codes`.
fn refusal_response(status: u16, codes: &[&'static str]) -> Response {
    for code in codes {
        meaning(status, code);
    }
    let listed: Vec<String> = codes.iter().map(|code| format!("`{code}`")).collect();
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or("Refused");
    // The codes are listed in words and in `x-kiln-codes`, not as an enum of the
    // body's schema: a client generated from this description keeps reading refusals
    // when a later server adds a code.
    let mut response = ResponseBuilder::new()
        .description(format!("{reason}: {}.", listed.join(", ")))
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name(ApiError::name()))),
        )
        .extensions(Some(
            ExtensionsBuilder::new().add("x-kiln-codes", codes).build(),
        ));
    if status == 429 || status == 503 {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::Integer).build())
                .description(Some("Seconds to wait before sending again."))
                .build(),
        );
    }
    response.build()
}

fn http_method(method: &Method) -> HttpMethod {
    match *method {
        Method::GET => HttpMethod::Get,
        Method::POST => HttpMethod::Post,
        Method::PUT => HttpMethod::Put,
        Method::DELETE => HttpMethod::Delete,
        Method::PATCH => HttpMethod::Patch,
        Method::HEAD => HttpMethod::Head,
        Method::OPTIONS => HttpMethod::Options,
        Method::TRACE => HttpMethod::Trace,
        ref other => panic!("the route table has a method OpenAPI cannot describe: {other}"),
    }
}

/// The operation of one route.
fn operation(route: &Described<'_>) -> Operation {
    let Described { endpoint, doc } = route;
    let mut parameters: Vec<Parameter> = path_parameter_names(endpoint.path)
        .into_iter()
        .map(|name| {
            let (description, example) = PATH_PARAMETERS
                .iter()
                .find(|(param, _, _)| *param == name)
                .map(|(_, description, example)| (*description, *example))
                .unwrap_or_else(|| panic!("path parameter {{{name}}} has no description"));
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(description))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some(SAFE_NAME_PATTERN)),
                ))
                .example(Some(json!(example)))
                .build()
        })
        .collect();
    if endpoint.access == Access::Holder {
        parameters.push(lease_header(true, "The lease token of the claim."));
    }
    parameters.extend(doc.parameters.iter().cloned());

    let mut by_status: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
    for (status, code) in row_refusals(endpoint, doc)
        .into_iter()
        .chain(doc.refusals.iter().copied())
    {
        let codes = by_status.entry(status).or_default();
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    let mut responses: Vec<(u16, Response)> = doc.answers.clone();
    for (status, codes) in by_status {
        assert!(
            !responses.iter().any(|(answered, _)| *answered == status),
            "{} {} answers and refuses with {status}",
            endpoint.method,
            endpoint.path
        );
        responses.push((status, refusal_response(status, &codes)));
    }
    responses.sort_by_key(|(status, _)| *status);

    let mut description = String::new();
    if let Some(words) = doc.description {
        description.push_str(words);
        description.push_str("\n\n");
    }
    description.push_str(&format!("Who may call: {}.", access_words(endpoint.access)));
    if endpoint.long_poll {
        description.push_str(
            " A long poll: the call may wait, and stops waiting when its client hangs up.",
        );
    }

    // One extension holding the row's facts: utoipa keeps extensions in a hash map, and
    // a single key keeps the written description the same from run to run.
    let mut row = serde_json::Map::new();
    row.insert("long_poll".into(), json!(endpoint.long_poll));
    if let BodyLimit::Max(bytes) = endpoint.body_limit {
        if doc.body.is_some() {
            row.insert("body_limit".into(), json!(bytes));
        }
    }
    if let Access::Read { public } = endpoint.access {
        row.insert("public_read".into(), json!(public));
    }
    let extensions = ExtensionsBuilder::new().add("x-kiln-route", row);
    let security =
        security_of(endpoint.access)
            .into_iter()
            .map(|schemes| match schemes.as_slice() {
                [] => SecurityRequirement::default(),
                [scheme] => SecurityRequirement::new(*scheme, Vec::<String>::new()),
                _ => unreachable!("a requirement names one scheme"),
            });
    let mut operation = OperationBuilder::new()
        .operation_id(Some(doc.operation_id))
        .tag(doc.tag)
        .summary(Some(doc.summary))
        .description(Some(description))
        .parameters(Some(parameters))
        .request_body(doc.body.clone())
        .securities(Some(security))
        .extensions(Some(extensions.build()));
    for (status, response) in responses {
        operation = operation.response(status.to_string(), response);
    }
    operation.build()
}

/// The description of the routes given, with the schemas they use.
pub(super) fn describe(routes: &[Described<'_>]) -> OpenApi {
    let mut paths = Paths::new();
    let mut components = Components::new();
    let mut operation_ids = Vec::new();
    for route in routes {
        let Described { endpoint, doc } = route;
        assert!(
            !operation_ids.contains(&doc.operation_id),
            "operation id {} is used twice",
            doc.operation_id
        );
        operation_ids.push(doc.operation_id);
        for (name, schema) in &doc.schemas {
            components.schemas.insert(name.clone(), schema.clone());
        }
        let item = PathItem::new(http_method(&endpoint.method), operation(route));
        match paths.paths.get_mut(endpoint.path) {
            Some(existing) => existing.merge_operations(item),
            None => {
                paths.paths.insert(endpoint.path.to_owned(), item);
            }
        }
    }
    components
        .schemas
        .insert(ApiError::name().into_owned(), ApiError::schema());
    components.security_schemes.insert(
        ADMIN_SCHEME.into(),
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "The admin token (DATA/admin.token): the operators' credential.",
                ))
                .build(),
        ),
    );
    components.security_schemes.insert(
        JOIN_SCHEME.into(),
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "The join token (DATA/client.token): it only enrolls a client, which gets \
                     a secret of its own.",
                ))
                .build(),
        ),
    );
    components.security_schemes.insert(
        CLIENT_SCHEME.into(),
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Basic)
                .description(Some(
                    "A client's own id and secret, from enrolling or from `kiln server client \
                     add`.",
                ))
                .build(),
        ),
    );
    let tags = [
        (
            "meta",
            "The server itself: liveness, credentials, storage, metrics, this description.",
        ),
        (
            "builds",
            "Builds: submit, list, read, delete; their jobs, events, images and files.",
        ),
        (
            "jobs",
            "Jobs: claims and offers, sessions, what a holder reports, what operators do.",
        ),
        (
            "images",
            "The chunked image transfer and image downloads (see docs/transfer.md).",
        ),
        (
            "clients",
            "The client inventory, enrollment and client credentials.",
        ),
        (
            "streams",
            "Server-sent event streams of the farm, a build and a job, for the dashboard \
             and other followers.",
        ),
    ]
    .map(|(name, description)| {
        TagBuilder::new()
            .name(name)
            .description(Some(description))
            .build()
    });
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("kiln")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(format!(
                    "The HTTP API of a kiln server: a distributed build farm for installed \
                     software images. Bodies are JSON unless said otherwise; times are unix \
                     microseconds. See docs/api.md for a walk-through.\n\n\
                     Every refusal is an ApiError `{{code, error}}` whose `code` is stable; \
                     each answer lists the codes it may carry:\n\n{}",
                    codes_table()
                )))
                .license(Some(
                    LicenseBuilder::new()
                        .name("Apache-2.0")
                        .identifier(Some("Apache-2.0"))
                        .build(),
                ))
                .build(),
        )
        .paths(paths)
        .components(Some(components))
        .tags(Some(tags))
        .build()
}

/// The description as the JSON text `kiln openapi` writes and the server serves.
pub fn to_json(document: &OpenApi) -> String {
    let mut text = document
        .to_pretty_json()
        .expect("an OpenAPI document serializes");
    text.push('\n');
    text
}
