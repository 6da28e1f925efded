//! Clients: the inventory, enrollment, and client credentials.

use super::error::HttpError;
use super::Shared;
use crate::farm::clients::JoinTokenAction;
use crate::farm::{Caller, FarmError};
use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use kiln_proto::api::{ClientInfo, ClientSecret, CredentialInfo};
use serde::Deserialize;

type Answer<T> = Result<T, HttpError>;

/// `GET /v1/clients`: every client, with its history and what it holds now.
pub async fn list(state: Shared, _caller: Caller) -> Answer<Json<Vec<ClientInfo>>> {
    Ok(Json(state.farm.clients().await?))
}

#[derive(Deserialize)]
pub struct EnrollRequest {
    client_id: String,
}

/// `POST /v1/enroll`: with the join token, a new client id gets its own secret.
pub async fn enroll(
    state: Shared,
    Json(request): Json<EnrollRequest>,
) -> Answer<(StatusCode, Json<ClientSecret>)> {
    let secret = state.farm.enroll(&request.client_id).await?;
    Ok((StatusCode::CREATED, Json(secret)))
}

/// `GET /v1/credentials`: every client credential (never a secret or its hash).
pub async fn credentials(state: Shared) -> Answer<Json<Vec<CredentialInfo>>> {
    Ok(Json(state.farm.credentials().await?))
}

/// `POST /v1/credentials/ID`: a new secret for client ID.
pub async fn issue_credential(
    state: Shared,
    Path(id): Path<String>,
) -> Answer<(StatusCode, Json<ClientSecret>)> {
    let secret = state.farm.issue_credential(&id).await?;
    Ok((StatusCode::CREATED, Json(secret)))
}

/// `DELETE /v1/credentials/ID`: client ID's secret stops working.
pub async fn revoke_credential(state: Shared, Path(id): Path<String>) -> Answer<StatusCode> {
    state.farm.revoke_credential(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct JoinTokenRequest {
    /// `rotate` (a new token, returned once) or `disable`.
    action: String,
}

/// `POST /v1/join-token`: rotates or disables the join token.
pub async fn join_token(
    state: Shared,
    Json(request): Json<JoinTokenRequest>,
) -> Answer<Json<serde_json::Value>> {
    let action = match request.action.as_str() {
        "rotate" => JoinTokenAction::Rotate,
        "disable" => JoinTokenAction::Disable,
        other => {
            return Err(FarmError::invalid(
                "bad_action",
                format!("join-token action {other:?} is neither \"rotate\" nor \"disable\""),
            )
            .into())
        }
    };
    let token = state.farm.change_join_token(action)?;
    Ok(Json(serde_json::json!({ "join_token": token })))
}
