//! NRI's connection multiplexer: two ttrpc connections over the one Unix socket a plugin opens
//! to the runtime.
//!
//! Every frame on the socket is a 4-byte big-endian connection id, a 4-byte big-endian payload
//! length, and the payload. Connection [`PLUGIN_SERVICE_CONN`] carries the runtime's calls to the
//! plugin, connection [`RUNTIME_SERVICE_CONN`] the plugin's calls to the runtime. Each connection
//! is a byte stream: one ttrpc message may span several frames, so [`split`] hands each side an
//! ordinary duplex stream and moves bytes between it and the socket.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::AbortOnDrop;

/// The connection on which the runtime calls the plugin's `Plugin` service.
pub const PLUGIN_SERVICE_CONN: u32 = 1;
/// The connection on which the plugin calls the runtime's `Runtime` service.
pub const RUNTIME_SERVICE_CONN: u32 = 2;

/// Largest frame payload accepted or sent: a whole ttrpc message (4 MiB) and its 10-byte header.
pub const MAX_FRAME_PAYLOAD_BYTES: usize = 4 * 1024 * 1024 + 10;

/// Bytes buffered per direction of each connection before the socket reader waits.
const CONN_BUFFER_BYTES: usize = 256 * 1024;

/// The header of a multiplexer frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Which connection the payload belongs to.
    pub conn: u32,
    /// Payload length in bytes.
    pub len: u32,
}

impl FrameHeader {
    /// Encoded size.
    pub const LEN_BYTES: usize = 8;

    /// Encodes the header.
    #[must_use]
    pub fn encode(self) -> [u8; Self::LEN_BYTES] {
        let mut out = [0; Self::LEN_BYTES];
        out[..4].copy_from_slice(&self.conn.to_be_bytes());
        out[4..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes a header.
    #[must_use]
    pub fn decode(bytes: [u8; Self::LEN_BYTES]) -> Self {
        let [a, b, c, d, e, f, g, h] = bytes;
        Self {
            conn: u32::from_be_bytes([a, b, c, d]),
            len: u32::from_be_bytes([e, f, g, h]),
        }
    }
}

/// The two connections of a multiplexed socket, seen from one end.
#[derive(Debug)]
pub struct Connections {
    /// Connection 1 (the runtime calls the plugin here).
    pub plugin_service: DuplexStream,
    /// Connection 2 (the plugin calls the runtime here).
    pub runtime_service: DuplexStream,
    /// Ends when the socket closes or breaks (with the reason); both connections then read EOF.
    pub done: JoinHandle<io::Result<()>>,
}

/// Splits a socket into its two multiplexed connections. Works from either end: the runtime
/// double in tests uses it too.
pub fn split<S>(socket: S) -> Connections
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(socket);
    let writer = Arc::new(Mutex::new(writer));
    let (plugin_user, plugin_mux) = tokio::io::duplex(CONN_BUFFER_BYTES);
    let (runtime_user, runtime_mux) = tokio::io::duplex(CONN_BUFFER_BYTES);
    let (plugin_rx, mut plugin_tx) = tokio::io::split(plugin_mux);
    let (runtime_rx, mut runtime_tx) = tokio::io::split(runtime_mux);

    let pumps = AbortOnDrop(vec![
        tokio::spawn(pump_out(PLUGIN_SERVICE_CONN, plugin_rx, writer.clone())).abort_handle(),
        tokio::spawn(pump_out(RUNTIME_SERVICE_CONN, runtime_rx, writer)).abort_handle(),
    ]);
    // The pumps hold the socket's write half: they end with this task, even when it is aborted.
    let done = tokio::spawn(async move {
        let result = async {
            loop {
                let mut header = [0; FrameHeader::LEN_BYTES];
                match reader.read_exact(&mut header).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
                let header = FrameHeader::decode(header);
                let len = header.len as usize;
                if len > MAX_FRAME_PAYLOAD_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "multiplexer frame of {len} bytes exceeds {MAX_FRAME_PAYLOAD_BYTES}"
                        ),
                    ));
                }
                let mut payload = vec![0; len];
                reader.read_exact(&mut payload).await?;
                let target = match header.conn {
                    PLUGIN_SERVICE_CONN => &mut plugin_tx,
                    RUNTIME_SERVICE_CONN => &mut runtime_tx,
                    other => {
                        // Nothing else is defined; a peer that opens more connections gets no
                        // answer on them rather than a torn-down socket.
                        tracing::debug!(conn = other, "frame for an unknown connection dropped");
                        continue;
                    }
                };
                target.write_all(&payload).await?;
            }
        }
        .await;
        drop(pumps);
        // Dropping the mux halves makes both connections read EOF.
        drop(plugin_tx);
        drop(runtime_tx);
        result
    });
    Connections {
        plugin_service: plugin_user,
        runtime_service: runtime_user,
        done,
    }
}

/// Moves what one side writes on a connection into frames on the socket.
async fn pump_out<R, W>(conn: u32, mut from: R, socket: Arc<Mutex<W>>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = from.read(&mut buf[FrameHeader::LEN_BYTES..]).await?;
        if n == 0 {
            return Ok(());
        }
        let len = u32::try_from(n).map_err(|_| io::Error::other("frame too large"))?;
        buf[..FrameHeader::LEN_BYTES].copy_from_slice(&FrameHeader { conn, len }.encode());
        let mut socket = socket.lock().await;
        socket.write_all(&buf[..FrameHeader::LEN_BYTES + n]).await?;
        socket.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_big_endian() {
        let header = FrameHeader {
            conn: RUNTIME_SERVICE_CONN,
            len: 0x0102_0304,
        };
        assert_eq!(header.encode(), [0, 0, 0, 2, 1, 2, 3, 4]);
        assert_eq!(FrameHeader::decode(header.encode()), header);
    }

    #[tokio::test]
    async fn carries_each_connection_separately_in_both_directions() {
        let (a, b) = tokio::io::duplex(1024);
        let mut left = split(a);
        let mut right = split(b);
        left.plugin_service.write_all(b"to plugin").await.unwrap();
        left.runtime_service.write_all(b"to runtime").await.unwrap();
        let mut buf = [0; 10];
        right.runtime_service.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"to runtime");
        let mut buf = [0; 9];
        right.plugin_service.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"to plugin");
        right.plugin_service.write_all(b"reply").await.unwrap();
        let mut buf = [0; 5];
        left.plugin_service.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"reply");
    }

    #[tokio::test]
    async fn a_message_larger_than_a_frame_arrives_whole() {
        let (a, b) = tokio::io::duplex(4096);
        let mut left = split(a);
        let mut right = split(b);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let send = big.clone();
        let writer = tokio::spawn(async move {
            left.plugin_service.write_all(&send).await.unwrap();
            left
        });
        let mut got = vec![0; big.len()];
        right.plugin_service.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn frames_are_read_exactly_as_the_runtime_writes_them() {
        // A frame written by hand, as the Go multiplexer puts it on the wire.
        let (mut raw, b) = tokio::io::duplex(1024);
        let mut conns = split(b);
        let mut frame = FrameHeader { conn: 1, len: 3 }.encode().to_vec();
        frame.extend_from_slice(b"abc");
        raw.write_all(&frame).await.unwrap();
        let mut buf = [0; 3];
        conns.plugin_service.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"abc");
        // And what the plugin writes comes out framed for connection 2.
        conns.runtime_service.write_all(b"xy").await.unwrap();
        let mut out = [0; 10];
        raw.read_exact(&mut out).await.unwrap();
        assert_eq!(out, [0, 0, 0, 2, 0, 0, 0, 2, b'x', b'y']);
    }

    #[tokio::test]
    async fn an_oversized_frame_ends_the_socket_and_both_connections_read_eof() {
        let (mut raw, b) = tokio::io::duplex(1024);
        let mut conns = split(b);
        let len = u32::try_from(MAX_FRAME_PAYLOAD_BYTES + 1).unwrap();
        raw.write_all(&FrameHeader { conn: 1, len }.encode())
            .await
            .unwrap();
        let err = conns.done.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut buf = Vec::new();
        conns.plugin_service.read_to_end(&mut buf).await.unwrap();
        conns.runtime_service.read_to_end(&mut buf).await.unwrap();
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn socket_close_ends_cleanly() {
        let (raw, b) = tokio::io::duplex(1024);
        let conns = split(b);
        drop(raw);
        conns.done.await.unwrap().unwrap();
    }
}
