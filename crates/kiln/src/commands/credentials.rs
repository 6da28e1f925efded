//! `kiln server client add|revoke|list` and `kiln server join-token rotate|disable`:
//! on a data directory directly, or on a running server with the admin credential.

use crate::cli::{AdminTarget, CredentialAction, JoinTokenAction, ServerAction};
use crate::operator::{Operator, Usage};
use anyhow::Context;
use kiln_proto::api::{ClientSecret, CredentialInfo};
use kiln_store::{Clients, CredentialPut, CredentialWrite, SqliteStore};
use std::path::Path;
use std::process::ExitCode;

pub async fn run(action: ServerAction) -> anyhow::Result<ExitCode> {
    match action {
        ServerAction::Client(args) => match args.action {
            CredentialAction::Add { id, target } => add(&id, &target).await,
            CredentialAction::Revoke { id, target } => revoke(&id, &target).await,
            CredentialAction::List { json, target } => list(json, &target).await,
        },
        ServerAction::JoinToken(args) => match args.action {
            JoinTokenAction::Rotate(target) => join_token(&target, true).await,
            JoinTokenAction::Disable(target) => join_token(&target, false).await,
        },
    }
}

/// A data directory's store: it must exist already (a typo must not make a new one).
async fn open_store(data: &Path) -> anyhow::Result<SqliteStore> {
    let db = data.join("kiln.db");
    if !db.exists() {
        return Err(Usage(format!(
            "{} holds no kiln server data (no kiln.db)",
            data.display()
        ))
        .into());
    }
    SqliteStore::open(&db)
        .await
        .with_context(|| format!("opening {}", db.display()))
}

fn operator(target: &AdminTarget) -> anyhow::Result<Operator> {
    let server = target
        .server
        .clone()
        .or_else(|| std::env::var("KILN_SERVER").ok())
        .unwrap_or_else(|| "http://127.0.0.1:7070".into());
    Operator::new(&crate::cli::ServerOpts {
        server,
        token_file: target.token_file.clone(),
        ca_file: target.ca_file.clone(),
    })
}

fn check_id(id: &str) -> anyhow::Result<()> {
    kiln_proto::names::check_name("client id", id).map_err(|msg| Usage(msg).into())
}

async fn add(id: &str, target: &AdminTarget) -> anyhow::Result<ExitCode> {
    check_id(id)?;
    let secret = match &target.data {
        Some(data) => {
            let store = open_store(data).await?;
            let secret = kiln_common::secret::new_secret();
            let hash = kiln_server::hash_secret(&secret)?;
            let put = store
                .put_client_credential(id, &hash, CredentialWrite::Issue, kiln_common::now_micros())
                .await?;
            if put == CredentialPut::Replaced {
                println!("client {id}: its previous secret no longer works");
            }
            secret
        }
        None => {
            let operator = operator(target)?;
            let issued: ClientSecret = operator.post_json(&format!("/v1/credentials/{id}")).await?;
            issued.secret
        }
    };
    println!(
        "client {id}: a new secret; give it to the client as its secret (buildclient.xml \
         USERNAME {id} and PASSWORD, or --id {id} --token-file FILE). It is not shown again."
    );
    println!("{secret}");
    Ok(ExitCode::SUCCESS)
}

async fn revoke(id: &str, target: &AdminTarget) -> anyhow::Result<ExitCode> {
    check_id(id)?;
    match &target.data {
        Some(data) => {
            let store = open_store(data).await?;
            if !store
                .revoke_client_credential(id, kiln_common::now_micros())
                .await?
            {
                anyhow::bail!("client {id:?} has no live credential in {}", data.display());
            }
        }
        None => {
            let operator = operator(target)?;
            operator
                .send(operator.request(reqwest::Method::DELETE, &format!("/v1/credentials/{id}")))
                .await?;
        }
    }
    println!("client {id}: credential revoked; its calls are refused from now on");
    Ok(ExitCode::SUCCESS)
}

async fn list(json: bool, target: &AdminTarget) -> anyhow::Result<ExitCode> {
    let credentials: Vec<CredentialInfo> = match &target.data {
        Some(data) => open_store(data)
            .await?
            .client_credentials()
            .await?
            .into_iter()
            .map(|row| CredentialInfo {
                client_id: row.client_id,
                origin: row.origin,
                created_at: row.created_at,
                revoked_at: row.revoked_at,
            })
            .collect(),
        None => operator(target)?.get_json("/v1/credentials").await?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&credentials)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<24} {:<9} {:<8}", "CLIENT", "ORIGIN", "STATE");
    for credential in &credentials {
        let state = if credential.revoked_at.is_some() {
            "revoked"
        } else {
            "live"
        };
        println!(
            "{:<24} {:<9} {:<8}",
            credential.client_id, credential.origin, state
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn join_token(target: &AdminTarget, rotate: bool) -> anyhow::Result<ExitCode> {
    let token = match &target.data {
        Some(data) => {
            if !data.join("kiln.db").exists() {
                return Err(Usage(format!(
                    "{} holds no kiln server data (no kiln.db)",
                    data.display()
                ))
                .into());
            }
            let file = target
                .client_token_file
                .clone()
                .unwrap_or_else(|| data.join("client.token"));
            let token = rotate.then(kiln_common::secret::new_secret);
            kiln_common::secret::write_secret_file(&file, token.as_deref().unwrap_or("disabled"))?;
            println!(
                "join token written to {} (a running server takes it at its next start)",
                file.display()
            );
            token
        }
        None => {
            let operator = operator(target)?;
            let action = if rotate { "rotate" } else { "disable" };
            let response = operator
                .send(
                    operator
                        .request(reqwest::Method::POST, "/v1/join-token")
                        .json(&serde_json::json!({ "action": action })),
                )
                .await?;
            let body: serde_json::Value = response.json().await.context("reading the answer")?;
            body["join_token"].as_str().map(str::to_owned)
        }
    };
    match token {
        Some(token) => {
            println!("a new join token; the old one no longer enrolls clients:");
            println!("{token}");
        }
        None => println!("join token disabled: no client can enroll until it is rotated"),
    }
    Ok(ExitCode::SUCCESS)
}
