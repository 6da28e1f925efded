//! Who is calling, and whether they may: [`authorize`] is the one middleware that
//! decides, from the route's [`Access`], whether a call reaches its handler, and
//! leaves the [`Caller`] in the request. The credential comes in the `Authorization`
//! header: `Bearer TOKEN` (the admin or join token), or `Basic` with a client id and
//! secret; the farm says who that makes ([`crate::domain::Farm::identify`]).

use super::error::HttpError;
use super::{Access, ServerState};
use crate::domain::credentials::Presented;
use crate::domain::{Caller, FarmError};
use axum::extract::{FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::Arc;

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, HttpError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            HttpError(FarmError::Internal(
                "route served without authorization".into(),
            ))
        })
    }
}

/// Decides whether a request may reach its handler, from its route's [`Access`], and
/// leaves the [`Caller`] in the request for the handler.
pub async fn authorize(
    state: Arc<ServerState>,
    access: Access,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    match decide(&state, access, &mut parts).await {
        Ok(caller) => {
            parts.extensions.insert(caller);
            next.run(Request::from_parts(parts, body)).await
        }
        Err(err) => HttpError(err).into_response(),
    }
}

/// The credential the `Authorization` header presents; `Ok(None)` without one.
fn presented(parts: &Parts) -> Result<Option<Presented>, FarmError> {
    let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let not_understood = || {
        FarmError::NotAuthenticated(
            "the Authorization header is neither 'Bearer TOKEN' nor 'Basic' with a client \
             id and secret"
                .into(),
        )
    };
    let value = header.to_str().map_err(|_| not_understood())?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Ok(Some(Presented::Bearer(token.trim().to_owned())));
    }
    let encoded = value.strip_prefix("Basic ").ok_or_else(not_understood)?;
    let decoded = base64_decode(encoded.trim()).ok_or_else(not_understood)?;
    let decoded = String::from_utf8(decoded).map_err(|_| not_understood())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(not_understood)?;
    Ok(Some(Presented::Basic {
        id: id.to_owned(),
        secret: secret.to_owned(),
    }))
}

async fn decide(
    state: &ServerState,
    access: Access,
    parts: &mut Parts,
) -> Result<Caller, FarmError> {
    if access == Access::Open {
        // Whatever credential comes with it: a liveness probe needs none.
        return Ok(Caller::Anonymous);
    }
    let farm = &state.farm;
    let caller = match presented(parts)? {
        Some(presented) => farm.identify(Some(presented)).await?,
        None => dashboard_session(state, parts).await?,
    };
    let Some(caller) = caller else {
        return match access {
            Access::Read { public: true } if farm.config().public_read => Ok(Caller::Anonymous),
            _ => Err(FarmError::NotAuthenticated(
                "no credential: send Authorization: Bearer TOKEN (operators) or Basic \
                 with the client's id and secret"
                    .into(),
            )),
        };
    };
    match access {
        Access::Open | Access::AnyCredential => {}
        Access::Admin => caller.require_admin()?,
        Access::Client => {
            caller.require_client()?;
        }
        Access::Enroll => {
            if !matches!(caller, Caller::Join | Caller::Admin) {
                return Err(FarmError::NotAllowed(
                    "enrolling needs the join token (or the admin credential)".into(),
                ));
            }
        }
        Access::Holder => {
            let id = caller.require_client()?;
            let params = path_params(parts).await?;
            let (Some(build), Some(job)) = (params.get("build"), params.get("job")) else {
                return Err(FarmError::Internal(
                    "holder route without build and job".into(),
                ));
            };
            // A call without a lease, or with one that is not current, is answered by
            // the call itself (400 no_lease, 409 stale_lease). A current lease in the
            // hands of another client is refused here.
            if let Some(lease) =
                super::lease_header(&parts.headers).filter(|lease| !lease.is_empty())
            {
                farm.refuse_other_holder(id, build, job, lease).await?;
            }
        }
        Access::Read { .. } => match &caller {
            Caller::Admin => {}
            Caller::Client(id) => {
                let params = path_params(parts).await?;
                let Some(build) = params.get("build") else {
                    return Err(FarmError::NotAllowed(
                        "a client reads only the builds it runs a job of".into(),
                    ));
                };
                if !farm.runs_job_of(id, build).await? {
                    return Err(FarmError::NotAllowed(format!(
                        "client {id:?} runs no job of build {build:?}: it cannot read it"
                    )));
                }
            }
            _ => caller.require_admin()?,
        },
    }
    Ok(caller)
}

/// The admin, for a request with a live dashboard session cookie (and no
/// `Authorization` header). A call that changes something must also carry the
/// session's CSRF token in `x-kiln-csrf`: a page of another site cannot read it.
async fn dashboard_session(
    state: &ServerState,
    parts: &Parts,
) -> Result<Option<Caller>, FarmError> {
    let Some(cookie) = super::dashboard::session_cookie(&parts.headers) else {
        return Ok(None);
    };
    let Some(session) = state.farm.web_session(cookie).await? else {
        // An expired or logged-out session is no credential.
        return Ok(None);
    };
    let safe = matches!(
        parts.method,
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if !safe {
        let presented = parts
            .headers
            .get("x-kiln-csrf")
            .map(|value| value.as_bytes())
            .unwrap_or_default();
        let matches: bool =
            subtle::ConstantTimeEq::ct_eq(presented, session.csrf.as_bytes()).into();
        if !matches {
            return Err(FarmError::NotAllowed(
                "a dashboard session changes something only with its CSRF token in \
                 x-kiln-csrf"
                    .into(),
            ));
        }
    }
    Ok(Some(Caller::Admin))
}

async fn path_params(parts: &mut Parts) -> Result<HashMap<String, String>, FarmError> {
    let params = RawPathParams::from_request_parts(parts, &())
        .await
        .map_err(|err| FarmError::invalid("bad_request", err.to_string()))?;
    Ok(params
        .iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect())
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}
