//! A hand-driven lanrage peer for attack and protocol tests: it seals whatever message a test
//! wants with any key (a fresh one, or a former member's from its state dir), answers the
//! session layer's freshness challenges like a real daemon, and collects what it receives.
//! Create and use it inside a lab namespace (sockets belong to the namespace of the thread
//! that creates them): `lab.in_host(i, move || { let mut p = RawPeer::new(...); ... })`.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use base64::Engine as _;
use lanrage::seal::{Delivered, Sealer};
use lanrage::wire::Message;
use x25519_dalek::{PublicKey, StaticSecret};

/// A peer speaking lanrage's control protocol by hand.
pub struct RawPeer {
    /// Its session layer.
    pub sealer: Sealer,
    /// Its socket.
    pub sock: UdpSocket,
    /// Its public key.
    pub public: [u8; 32],
    /// Bytes it sent, in total.
    pub sent_bytes: usize,
}

impl RawPeer {
    /// A peer with `secret`, bound to `bind`.
    pub fn new(secret: StaticSecret, bind: SocketAddr) -> io::Result<Self> {
        let public = PublicKey::from(&secret).to_bytes();
        let sock = UdpSocket::bind(bind)?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(RawPeer {
            sealer: Sealer::new(secret, rand::random(), Instant::now()),
            sock,
            public,
            sent_bytes: 0,
        })
    }

    /// A peer with a fresh random key.
    pub fn random(bind: SocketAddr) -> io::Result<Self> {
        Self::new(StaticSecret::random_from_rng(rand::rngs::OsRng), bind)
    }

    /// Seals and sends `msg` to `key` at `to`.
    pub fn send(&mut self, to: SocketAddr, key: &[u8; 32], msg: &Message) {
        if let Some(bytes) = self.sealer.seal(key, msg, Instant::now()) {
            self.send_raw(to, &bytes);
        }
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, to: SocketAddr, bytes: &[u8]) {
        if self.sock.send_to(bytes, to).is_ok() {
            self.sent_bytes += bytes.len();
        }
    }

    /// Receives for `dur`, answering freshness challenges; returns what was delivered.
    pub fn pump(&mut self, dur: Duration) -> Vec<Delivered> {
        let deadline = Instant::now() + dur;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            if let Ok(Some(d)) = self.sealer.open(&buf[..n], from, Instant::now()) {
                out.push(d);
            }
            while let Some((to, bytes)) = self.sealer.poll_transmit() {
                self.send_raw(to, &bytes);
            }
        }
        out
    }
}

/// The messages among `delivered`.
pub fn messages(delivered: &[Delivered]) -> Vec<Message> {
    delivered
        .iter()
        .filter_map(|d| match d {
            Delivered::Message { msg, .. } => Some(msg.clone()),
            Delivered::PeerVersion { .. } => None,
        })
        .collect()
}

/// A node's public key from its `status --json`.
pub fn public_key(status: &serde_json::Value) -> [u8; 32] {
    let b64 = status["node"]["public_key"]
        .as_str()
        .expect("status has node.public_key");
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 key")
        .try_into()
        .expect("32-byte key")
}

/// A node's private key, read from its state directory.
pub fn secret_of(state_dir: &std::path::Path) -> StaticSecret {
    lanrage::identity::Identity::load_or_create(state_dir)
        .expect("the node's key")
        .secret
}
