//! Cancel requests to a node: the proxy forwards a client's CancelRequest,
//! and a lease retiring a connection whose results were still coming stops
//! the query it was running.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire;

/// Ask the server at `addr` to cancel what backend `key` is running, and
/// wait until it has: the server closes the connection once it has
/// signalled the backend. Bounded in time; a failure is logged, never
/// waited for.
pub async fn send(addr: std::sync::Arc<str>, key: (i32, i32)) -> bool {
    let mut packet = BytesMut::with_capacity(16);
    packet.put_i32(16);
    packet.put_i32(wire::CANCEL_REQUEST);
    packet.put_i32(key.0);
    packet.put_i32(key.1);
    let sent = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(&*addr).await?;
        s.write_all(&packet).await?;
        s.shutdown().await?;
        // The server sends nothing back; anything it did is discarded.
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
    let ok = matches!(sent, Ok(Ok(())));
    if !ok {
        tracing::warn!(%addr, "could not send a cancel request");
    }
    ok
}

/// Stop what backend `key` is running on a connection being closed: cancel
/// now, and again twice a little later. A server ignores a cancel that
/// arrives while it is still reading the statement (the statement then
/// runs to its end, for nobody); a cancel for a backend that has stopped
/// or gone does nothing.
pub async fn send_until_stopped(addr: std::sync::Arc<str>, key: (i32, i32)) {
    for wait in [0, 200, 1000] {
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if !send(addr.clone(), key).await {
            return;
        }
    }
}
