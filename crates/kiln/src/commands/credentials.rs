//! `kiln server client add|revoke|list` and `kiln server join-token rotate|disable`:
//! on a data directory directly (kiln-server's `offline`), or on a running server with
//! the admin credential.

use crate::cli::{AdminTarget, CredentialAction, JoinTokenAction, ServerAction};
use crate::operator::Usage;
use kiln_api::Operator;
use kiln_proto::api::CredentialInfo;
use kiln_server::offline::{self, OfflineCredentials};
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

fn operator(target: &AdminTarget) -> anyhow::Result<Operator> {
    let server = target
        .server
        .clone()
        .or_else(|| std::env::var("KILN_SERVER").ok())
        .unwrap_or_else(|| "http://127.0.0.1:7070".into());
    crate::operator::operator(&crate::cli::ServerOpts {
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
            let issued = OfflineCredentials::open(data).await?.issue(id).await?;
            if issued.replaced {
                println!("client {id}: its previous secret no longer works");
            }
            issued.secret.secret
        }
        None => operator(target)?.issue_credential(id).await?.secret,
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
        Some(data) => OfflineCredentials::open(data).await?.revoke(id).await?,
        None => operator(target)?.revoke_credential(id).await?,
    }
    println!("client {id}: credential revoked; its calls are refused from now on");
    Ok(ExitCode::SUCCESS)
}

async fn list(json: bool, target: &AdminTarget) -> anyhow::Result<ExitCode> {
    let credentials: Vec<CredentialInfo> = match &target.data {
        Some(data) => OfflineCredentials::open(data).await?.list().await?,
        None => operator(target)?.credentials().await?,
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
            let (file, token) =
                offline::set_join_token(data, target.client_token_file.as_deref(), rotate)?;
            println!(
                "join token written to {} (a running server takes it at its next start)",
                file.display()
            );
            token
        }
        None => operator(target)?.set_join_token(rotate).await?,
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
