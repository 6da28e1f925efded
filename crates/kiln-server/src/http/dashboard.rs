//! The dashboard at `/`: one HTML page, a script and a style sheet, compiled into the
//! binary (no CDN, no build step), and the session calls behind its login.
//!
//! The page reads everything through the API (`/v1/...`) and its event streams
//! (`/v1/stream`, `/v1/builds/{build}/stream`, `/v1/jobs/{build}/{job}/stream`), with
//! the session cookie as its credential: `auth.rs` takes a valid session cookie as the
//! admin, and refuses a call that changes something (restart, cancel) unless it also
//! carries the session's CSRF token in `x-kiln-csrf`, which only a page of this origin
//! can read (`GET /ui/session`). The cookie is `HttpOnly`, `SameSite=Strict`, and
//! `Secure` when the server serves TLS.
//!
//! These routes are rows of the route table like every other, marked as not part of
//! the API (`described: false`), so the OpenAPI description leaves them out.

use super::error::HttpError;
use super::Shared;
use crate::domain::web::{SESSION_COOKIE, SESSION_SECS};
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// Only this origin's script, styles and connections; no frames, no inline script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

type Answer<T> = Result<T, HttpError>;

/// A page or asset with the headers every one of them carries.
fn served(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the dashboard's page. It shows nothing but a login form until the
/// session (or `--public-read`) lets its calls through.
pub async fn index() -> Response {
    served("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/{asset}`: the script and the style sheet.
pub async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => served("text/javascript; charset=utf-8", APP_JS),
        "app.css" => served("text/css; charset=utf-8", APP_CSS),
        _ => (
            StatusCode::NOT_FOUND,
            Json(kiln_proto::api::ApiError {
                code: "not_found".to_owned(),
                error: format!("no dashboard asset {name:?}"),
                missing: None,
            }),
        )
            .into_response(),
    }
}

/// The session cookie's value in a request, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

/// The `Set-Cookie` value for a session (or, with `None`, one that ends it).
fn set_cookie(value: Option<&str>, secure: bool) -> HeaderValue {
    let (value, max_age) = match value {
        Some(value) => (value, SESSION_SECS),
        None => ("", 0),
    };
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("a cookie of hex digits and dots is a valid header value")
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

/// What the page learns of its session.
#[derive(Serialize)]
pub struct SessionInfo {
    logged_in: bool,
    /// The token that calls which change something carry in `x-kiln-csrf`.
    #[serde(skip_serializing_if = "Option::is_none")]
    csrf: Option<String>,
    /// When the session ends (unix microseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
    /// Whether builds and jobs are readable without logging in.
    public_read: bool,
}

/// `POST /ui/login` with `{"token": ADMIN_TOKEN}`: a session cookie. Only the admin
/// token opens the dashboard.
pub async fn login(state: Shared, Json(login): Json<Login>) -> Answer<Response> {
    let farm = &state.farm;
    let made = farm.web_login(&login.token)?;
    let secure = farm.config().tls.is_some();
    let info = SessionInfo {
        logged_in: true,
        csrf: Some(made.csrf),
        expires_at: Some(made.expires_at),
        public_read: farm.config().public_read,
    };
    let mut response = Json(info).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, set_cookie(Some(&made.cookie), secure));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `POST /ui/logout`: ends the session, and asks the browser to forget the cookie.
pub async fn logout(state: Shared, headers: HeaderMap) -> Answer<Response> {
    if let Some(cookie) = session_cookie(&headers) {
        state.farm.web_logout(cookie).await?;
    }
    let secure = state.farm.config().tls.is_some();
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, set_cookie(None, secure))],
    )
        .into_response())
}

/// `GET /ui/session`: whether the cookie is a live session, with its CSRF token.
pub async fn session(state: Shared, headers: HeaderMap) -> Answer<Response> {
    let farm = &state.farm;
    let live = match session_cookie(&headers) {
        Some(cookie) => farm.web_session(cookie).await?,
        None => None,
    };
    let info = SessionInfo {
        logged_in: live.is_some(),
        expires_at: live.as_ref().map(|session| session.expires_at),
        csrf: live.map(|session| session.csrf),
        public_read: farm.config().public_read,
    };
    Ok((
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(info),
    )
        .into_response())
}
