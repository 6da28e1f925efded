//! [`TlsListener`]: an `axum::serve::Listener` that accepts TCP connections and hands
//! out those whose TLS handshake finished.
//!
//! Handshakes run in tasks of their own, never inside `accept`: one slow or hostile
//! peer (one that connects and says nothing, or speaks plain HTTP) cannot stall the
//! connections behind it. A handshake that has not finished within
//! [`HANDSHAKE_TIMEOUT`] is dropped.

use crate::ServerTls;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The longest a peer may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished handshakes waiting for `accept`; more wait in their tasks.
const READY_QUEUE: usize = 64;

/// A TCP listener whose connections come out TLS-wrapped (see the module's doc).
pub struct TlsListener {
    local_addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` with `tls`. Needs a Tokio runtime.
    pub fn new(listener: TcpListener, tls: &ServerTls) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
        let acceptor = TlsAcceptor::from(tls.config());
        let acceptor_task = tokio::spawn(accept_loop(listener, acceptor, ready_tx));
        Ok(TlsListener {
            local_addr,
            ready,
            acceptor_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Stops accepting (axum drops the listener when it shuts down).
        self.acceptor_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended (it only does when this listener is dropped).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

pub(crate) fn set_nodelay(tcp: &TcpStream) {
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::warn!(cause = %err, "cannot set TCP_NODELAY");
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = ready.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                wait_after_accept_error(err).await;
                continue;
            }
        };
        set_nodelay(&tcp);
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = ready.send((stream, peer)).await;
                }
                Ok(Err(err)) => tracing::debug!(%peer, cause = %err, "TLS handshake failed"),
                Err(_) => {
                    tracing::debug!(%peer, timeout_secs = HANDSHAKE_TIMEOUT.as_secs(), "TLS handshake timed out")
                }
            }
        });
    }
}

/// As axum does for plain TCP: a peer that went away before we accepted it is no
/// matter; anything else (out of file descriptors, say) is logged and waited out.
async fn wait_after_accept_error(err: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(cause = %err, "cannot accept a connection");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
