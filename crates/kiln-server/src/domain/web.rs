//! Dashboard sessions: the admin logs in with the admin token and gets a session
//! cookie; the session is the admin's until it expires or the admin logs out.
//!
//! A session is a signed value, `EXPIRES.NONCE.MAC`: the MAC is BLAKE3 keyed with a
//! key derived from the admin token, so a session survives a server restart (an open
//! dashboard reconnects by itself) and ends when the admin token changes. Each session
//! has a CSRF token derived from it, which every call that changes something must
//! carry in a header (see `http/auth.rs`). Logging out records the nonce in the store
//! until the session would have expired anyway, so a logout holds across restarts and
//! on every server sharing the store.

use super::{Farm, FarmError, FarmResult};
use subtle::ConstantTimeEq;

/// The cookie's name.
pub const SESSION_COOKIE: &str = "kiln_session";
/// How long a session lasts.
pub const SESSION_SECS: i64 = 12 * 3600;

/// A session just made.
#[derive(Debug, Clone)]
pub struct WebLogin {
    /// The cookie's value.
    pub cookie: String,
    /// The session's CSRF token.
    pub csrf: String,
    /// When it ends (unix microseconds).
    pub expires_at: i64,
}

/// A valid session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSession {
    pub csrf: String,
    pub expires_at: i64,
}

fn mac(key: &[u8; 32], text: &str) -> String {
    blake3::keyed_hash(key, text.as_bytes())
        .to_hex()
        .to_string()
}

impl Farm {
    /// Logs in with the admin token; nothing else (no client's credential, not the
    /// join token) opens the dashboard.
    pub fn web_login(&self, token: &str) -> FarmResult<WebLogin> {
        if self.credentials.bearer(token.trim()) != Some(super::Caller::Admin) {
            return Err(FarmError::NotAuthenticated(
                "that is not the admin token".into(),
            ));
        }
        let key = self.credentials.session_key();
        let expires_at = kiln_common::now_micros() + SESSION_SECS * 1_000_000;
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        let signed = format!("{expires_at}.{}", hex::encode(nonce));
        let cookie = format!("{signed}.{}", mac(&key, &signed));
        let csrf = mac(&key, &format!("csrf.{signed}"));
        Ok(WebLogin {
            cookie,
            csrf,
            expires_at,
        })
    }

    /// The session a cookie value names, if it is valid now: well signed, not
    /// expired, and not logged out (on any server sharing the store).
    pub async fn web_session(&self, cookie: &str) -> FarmResult<Option<WebSession>> {
        let Some((signed, presented_mac)) = cookie.rsplit_once('.') else {
            return Ok(None);
        };
        let Some((expires, nonce)) = signed.split_once('.') else {
            return Ok(None);
        };
        let Ok(expires_at) = expires.parse::<i64>() else {
            return Ok(None);
        };
        let key = self.credentials.session_key();
        let expected = mac(&key, signed);
        if !bool::from(expected.as_bytes().ct_eq(presented_mac.as_bytes())) {
            return Ok(None);
        }
        if expires_at <= kiln_common::now_micros() {
            return Ok(None);
        }
        if self.store.web_session_ended(nonce).await? {
            return Ok(None);
        }
        Ok(Some(WebSession {
            csrf: mac(&key, &format!("csrf.{signed}")),
            expires_at,
        }))
    }

    /// Ends the session a cookie value names, on every server sharing the store and
    /// across restarts.
    pub async fn web_logout(&self, cookie: &str) -> FarmResult<()> {
        let Some(session) = self.web_session(cookie).await? else {
            return Ok(());
        };
        if let Some((_, nonce)) = cookie
            .rsplit_once('.')
            .and_then(|(signed, _)| signed.split_once('.'))
        {
            self.store
                .end_web_session(nonce, session.expires_at, kiln_common::now_micros())
                .await?;
        }
        Ok(())
    }
}
