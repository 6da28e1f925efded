//! Clients: the inventory, enrollment, and client credentials.

use super::error::HttpError;
use super::{Doc, Shared};
use crate::domain::clients::JoinTokenAction;
use crate::domain::{Caller, FarmError};
use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use kiln_proto::api::{ClientInfo, ClientSecret, CredentialInfo};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

type Answer<T> = Result<T, HttpError>;

/// `GET /v1/clients`: every client, with its history and what it holds now.
pub async fn list(state: Shared, _caller: Caller) -> Answer<Json<Vec<ClientInfo>>> {
    Ok(Json(state.farm.clients().await?))
}

pub fn list_doc() -> Doc {
    Doc::new("clients", "list_clients", "The clients")
        .describe(
            "Each client that ever claimed a job on this server, and each heard from since \
             the server started: what it runs now, its last contact, and what became of the \
             jobs it took.",
        )
        .answers_list::<ClientInfo>(200, "Every client, by id.")
}

/// `POST /v1/enroll`: the id a new client takes.
#[derive(Deserialize, ToSchema)]
pub struct EnrollRequest {
    /// A safe name, not enrolled yet.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
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

pub fn enroll_doc() -> Doc {
    Doc::new("clients", "enroll", "Enroll a client")
        .describe(
            "With the join token, a new client id gets a secret of its own, in this answer \
             only; every later call goes with Basic ID:SECRET. A revoked id cannot enroll \
             again (403).",
        )
        .takes::<EnrollRequest>()
        .answers::<ClientSecret>(201, "The client's id and its secret.")
        .refuses(400, &["bad_name"])
        .refuses(409, &["client_exists"])
}

/// `GET /v1/credentials`: every client credential (never a secret or its hash).
pub async fn credentials(state: Shared) -> Answer<Json<Vec<CredentialInfo>>> {
    Ok(Json(state.farm.credentials().await?))
}

pub fn credentials_doc() -> Doc {
    Doc::new("clients", "list_credentials", "Every client credential")
        .answers_list::<CredentialInfo>(200, "Every client credential; never a secret.")
}

/// `POST /v1/credentials/ID`: a new secret for client ID.
pub async fn issue_credential(
    state: Shared,
    Path(id): Path<String>,
) -> Answer<(StatusCode, Json<ClientSecret>)> {
    let secret = state.farm.issue_credential(&id).await?;
    Ok((StatusCode::CREATED, Json(secret)))
}

pub fn issue_credential_doc() -> Doc {
    Doc::new("clients", "issue_credential", "A new secret for a client")
        .describe("Its old secret, revoked or not, stops working.")
        .answers::<ClientSecret>(201, "The client's id and its new secret.")
}

/// `DELETE /v1/credentials/ID`: client ID's secret stops working.
pub async fn revoke_credential(state: Shared, Path(id): Path<String>) -> Answer<StatusCode> {
    state.farm.revoke_credential(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub fn revoke_credential_doc() -> Doc {
    Doc::new(
        "clients",
        "revoke_credential",
        "Revoke a client's credential",
    )
    .describe("The id cannot enroll again until an operator issues it a new secret.")
    .answers_empty(204, "Revoked.")
    .refuses(404, &["not_found"])
}

/// `POST /v1/join-token`: what to do with the join token.
#[derive(Deserialize, ToSchema)]
pub struct JoinTokenRequest {
    /// `rotate` (a new token, returned once) or `disable`.
    #[schema(example = "rotate", pattern = "^(rotate|disable)$")]
    action: String,
}

/// The answer to a join-token change.
#[derive(Debug, Serialize, ToSchema)]
pub struct JoinToken {
    /// The new join token after `rotate`, in this answer only; `null` after `disable`.
    pub join_token: Option<String>,
}

/// `POST /v1/join-token`: rotates or disables the join token.
pub async fn join_token(
    state: Shared,
    Json(request): Json<JoinTokenRequest>,
) -> Answer<Json<JoinToken>> {
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
    let join_token = state.farm.change_join_token(action)?;
    Ok(Json(JoinToken { join_token }))
}

pub fn join_token_doc() -> Doc {
    Doc::new(
        "clients",
        "change_join_token",
        "Rotate or disable the join token",
    )
    .takes::<JoinTokenRequest>()
    .answers::<JoinToken>(200, "The join token changed.")
    .refuses(400, &["bad_action"])
}
