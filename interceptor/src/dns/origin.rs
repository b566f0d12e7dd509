//! Which sandboxed socket sent a DNS query. A UDP socket has no local port yet
//! when the connect hook runs, so the hooks record by socket cookie; the kernel's
//! sock_diag interface turns the query's source address back into that cookie.

use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::Socket;

/// The cookie of the UDP socket at `client` that would receive a datagram sent
/// from the DNS listener at `listener`.
pub fn socket_cookie(listener: SocketAddr, client: SocketAddr) -> io::Result<u64> {
    let (family, listener, client) = match (listener, client) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (
            if listener.is_ipv4() {
                AF_INET
            } else {
                AF_INET6
            },
            listener,
            client,
        ),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mixed address families",
            ))
        }
    };
    // The kernel looks the socket up as a receiver: source is the listener.
    let socket_id = SocketId {
        source_port: listener.port(),
        destination_port: client.port(),
        source_address: listener.ip(),
        destination_address: client.ip(),
        interface_id: 0,
        cookie: [0xff; 8],
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut reply = vec![0u8; 8192];
    let n = socket.recv(&mut &mut reply[..], 0)?;
    let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&reply[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            Ok(u64::from_ne_bytes(response.header.socket_id.cookie))
        }
        NetlinkPayload::Error(e) => Err(e
            .code
            .map(|code| io::Error::from_raw_os_error(-code.get()))
            .unwrap_or_else(|| io::Error::other("sock_diag: no such socket"))),
        _ => Err(io::Error::other("sock_diag: unexpected reply")),
    }
}
