//! Dashboard sessions: the admin logs in with the admin token and gets a session
//! cookie; the session is the admin's until it expires or the admin logs out.
//!
//! A session is a signed value, `EXPIRES.NONCE.MAC`: the MAC is BLAKE3 keyed with a
//! key derived from the admin token, so a session survives a server restart (an open
//! dashboard reconnects by itself) and ends when the admin token changes. Each session
//! has a CSRF token derived from it, which every call that changes something must
//! carry in a header (see `http/auth.rs`). Logging out revokes the nonce until the
//! session would have expired anyway.

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

    /// The session a cookie value names, if it is valid now.
    pub fn web_session(&self, cookie: &str) -> Option<WebSession> {
        let (signed, presented_mac) = cookie.rsplit_once('.')?;
        let (expires, nonce) = signed.split_once('.')?;
        let expires_at: i64 = expires.parse().ok()?;
        let key = self.credentials.session_key();
        let expected = mac(&key, signed);
        if !bool::from(expected.as_bytes().ct_eq(presented_mac.as_bytes())) {
            return None;
        }
        let now = kiln_common::now_micros();
        if expires_at <= now {
            return None;
        }
        let mut revoked = self.web_logouts.lock().expect("logouts lock");
        revoked.retain(|_, until| *until > now);
        if revoked.contains_key(nonce) {
            return None;
        }
        Some(WebSession {
            csrf: mac(&key, &format!("csrf.{signed}")),
            expires_at,
        })
    }

    /// Ends the session a cookie value names.
    pub fn web_logout(&self, cookie: &str) {
        let Some(session) = self.web_session(cookie) else {
            return;
        };
        if let Some((signed, _)) = cookie.rsplit_once('.') {
            if let Some((_, nonce)) = signed.split_once('.') {
                self.web_logouts
                    .lock()
                    .expect("logouts lock")
                    .insert(nonce.to_owned(), session.expires_at);
            }
        }
    }
}
