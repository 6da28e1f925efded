//! [`TcpProxy`]: a proxy on loopback between a client and a server that can cut the
//! network, slow it down, and heal it; the partition tests and the failover bench use
//! it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A TCP proxy on loopback in front of a server, that can cut the network: while cut,
/// it passes no byte either way but keeps every connection open, as a broken network
/// does (neither end sees a close). Dropping it closes every connection.
pub struct TcpProxy {
    /// `http://127.0.0.1:PORT`: give this to a client instead of the server's URL.
    pub url: String,
    address: std::net::SocketAddr,
    shared: std::sync::Arc<ProxyShared>,
}

#[derive(Default)]
struct ProxyShared {
    /// Cut for every connection, open now or opened later.
    cut: std::sync::atomic::AtomicBool,
    /// The proxy is going away: every pump ends.
    stopping: std::sync::atomic::AtomicBool,
    /// Bytes a second each way of each connection, 0 for no limit.
    rate: std::sync::atomic::AtomicU64,
    /// Each connection's own cut flag, for [`TcpProxy::cut_open_connections`].
    connections: std::sync::Mutex<Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>>,
}

/// How long a pump's read waits before it looks at the cut and stop flags again.
const PROXY_READ_TICK: Duration = Duration::from_millis(50);

impl TcpProxy {
    /// Starts a proxy to `target_url` (`http://HOST:PORT`).
    pub fn start(target_url: &str) -> Self {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let target = target_url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("not an http:// URL: {target_url}"))
            .trim_end_matches('/')
            .to_owned();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let address = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(ProxyShared::default());
        let accept_shared = shared.clone();
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if accept_shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(inbound) = inbound else { continue };
                let Ok(outbound) = TcpStream::connect(&target) else {
                    continue;
                };
                let own_cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
                accept_shared
                    .connections
                    .lock()
                    .expect("proxy connections poisoned")
                    .push(own_cut.clone());
                for (from, to) in [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let shared = accept_shared.clone();
                    let own_cut = own_cut.clone();
                    std::thread::spawn(move || proxy_pump(from, to, &shared, &own_cut));
                }
            }
        });
        TcpProxy {
            url: format!("http://{address}"),
            address,
            shared,
        }
    }

    /// Stops passing bytes, both ways, on every connection (those opened later too).
    pub fn cut(&self) {
        self.shared
            .cut
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Passes at most `bytes_per_sec` each way of each connection (0: no limit), as a
    /// slow network would.
    pub fn limit_rate(&self, bytes_per_sec: u64) {
        self.shared
            .rate
            .store(bytes_per_sec, std::sync::atomic::Ordering::SeqCst);
    }

    /// Passes bytes again on every connection; what was held back goes through.
    pub fn heal(&self) {
        use std::sync::atomic::Ordering;
        self.shared.cut.store(false, Ordering::SeqCst);
        for own_cut in self
            .shared
            .connections
            .lock()
            .expect("proxy connections poisoned")
            .iter()
        {
            own_cut.store(false, Ordering::SeqCst);
        }
    }

    /// Stops passing bytes on the connections open now only: their ends keep them
    /// open and silent (a close by either end is not passed on either), while new
    /// connections go through.
    pub fn cut_open_connections(&self) {
        for own_cut in self
            .shared
            .connections
            .lock()
            .expect("proxy connections poisoned")
            .iter()
        {
            own_cut.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.address);
    }
}

/// Copies bytes from `from` to `to` while neither the proxy nor this connection is cut;
/// a close is passed on (when not cut), and everything ends when the proxy stops.
fn proxy_pump(
    mut from: TcpStream,
    mut to: TcpStream,
    shared: &ProxyShared,
    own_cut: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let blocked = || shared.cut.load(Ordering::SeqCst) || own_cut.load(Ordering::SeqCst);
    let stopping = || shared.stopping.load(Ordering::SeqCst);
    let _ = from.set_read_timeout(Some(PROXY_READ_TICK));
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if stopping() {
            break;
        }
        // While cut, nothing is read either: a close by this end stays unseen.
        if blocked() {
            std::thread::sleep(PROXY_READ_TICK);
            continue;
        }
        let read = from.read(&mut buffer);
        if matches!(&read, Err(err) if matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted
        )) {
            continue;
        }
        // Whatever the read that was under way when the cut came brought (bytes, a
        // close, a reset) is held until the cut heals.
        while blocked() && !stopping() {
            std::thread::sleep(PROXY_READ_TICK);
        }
        match read {
            _ if stopping() => break,
            Ok(0) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n_read) => {
                if to.write_all(&buffer[..n_read]).is_err() {
                    break;
                }
                let rate = shared.rate.load(Ordering::SeqCst);
                if rate > 0 {
                    std::thread::sleep(Duration::from_secs_f64(n_read as f64 / rate as f64));
                }
            }
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
