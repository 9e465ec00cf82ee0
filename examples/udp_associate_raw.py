"""SOCKS 6 UDP ASSOCIATE from a raw client, built with the codec (draft-11 "Handling UDP ASSOCIATE").

Run a proxy and a UDP echo server on loopback, then this script:

    socks6fast serve --listen 127.0.0.1:1080 &
    python3 examples/udp_associate_raw.py 127.0.0.1 1080 127.0.0.1 7007

The script starts its own echo server on 127.0.0.1:7007 when nothing answers there. It
sends one datagram over plain UDP to the proxy's SOCKS 6 UDP port (by default the TCP
listener's address and port number) and one over the TCP connection, and prints the echoes.
"""

from __future__ import annotations

import socket
import sys
import threading

from socks6fast.constants import AddressType, AuthReplyType, Command, ReplyCode
from socks6fast.proto import codec
from socks6fast.proto.messages import (
    AssociationConfirmation,
    AssociationInit,
    Datagram,
    DatagramHeader,
    Request,
)


def read_message(tcp: socket.socket, buf: bytearray, decode: object) -> object:
    """Read from ``tcp`` until ``decode(buf)`` returns a whole message."""
    while True:
        message, n = decode(buf)  # type: ignore[operator]
        if message is not None:
            del buf[:n]
            return message
        data = tcp.recv(65536)
        if not data:
            raise EOFError("the proxy closed the connection")
        buf += data


def datagram(association_id: bytes, host: str, port: int, payload: bytes) -> bytes:
    """A Datagram message: Datagram Header + payload (Message Length covers both)."""
    kind = AddressType.IPV6 if ":" in host else AddressType.IPV4
    header_length = 16 + (16 if kind == AddressType.IPV6 else 4)
    buf = bytearray(header_length + len(payload))
    codec.encode_datagram_header(DatagramHeader(association_id, kind, host, port, len(buf)), buf)
    buf[header_length:] = payload
    return bytes(buf)


def echo_server(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError:
        return  # something listens there already

    def serve() -> None:
        while True:
            data, address = sock.recvfrom(65535)
            sock.sendto(data, address)

    threading.Thread(target=serve, daemon=True).start()


def main(proxy_host: str, proxy_port: int, echo_host: str, echo_port: int) -> None:
    echo_server(echo_host, echo_port)
    tcp = socket.create_connection((proxy_host, proxy_port), timeout=5)
    buf = bytearray()
    # 1. UDP ASSOCIATE; 0.0.0.0:0 = no particular bind address or port.
    tcp.sendall(codec.encode_request(Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0)))
    auth = read_message(tcp, buf, codec.decode_auth_reply)
    if auth.type != AuthReplyType.SUCCESS:  # type: ignore[attr-defined]
        raise SystemExit("udp_associate_raw: the proxy refused authentication")
    reply = read_message(tcp, buf, codec.decode_operation_reply)
    if reply.reply_code != ReplyCode.SUCCESS:  # type: ignore[attr-defined]
        code = ReplyCode(reply.reply_code)  # type: ignore[attr-defined]
        raise SystemExit(f"udp_associate_raw: the proxy refused UDP ASSOCIATE: {code.name} ({code:#04x})")
    print("remote-facing socket:", reply.address, reply.port)  # type: ignore[attr-defined]
    # 2. The Association Initialization carries the 8-byte ID.
    init = read_message(tcp, buf, codec.decode_association_message)
    assert isinstance(init, AssociationInit)
    aid = init.association_id
    # 3. A datagram over plain UDP to the proxy's UDP port; the Confirmation comes over TCP.
    udp = socket.socket(socket.AF_INET6 if ":" in proxy_host else socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    for _ in range(5):  # UDP may lose it: resend until the Confirmation arrives (UDP-10)
        udp.sendto(datagram(aid, echo_host, echo_port, b"hello over UDP"), (proxy_host, proxy_port))
        tcp.settimeout(1)
        try:
            confirmation = read_message(tcp, buf, codec.decode_association_message)
            break
        except TimeoutError:
            continue
    else:
        raise SystemExit("no Association Confirmation")
    assert confirmation == AssociationConfirmation(aid)
    data = udp.recv(65535)
    header, header_length = codec.decode_datagram_header(data)
    print("over UDP from", header.address, header.port, data[header_length : header.message_length])
    udp.close()
    tcp.close()
    # Over the TCP connection instead: a new association, datagrams framed by Message Length.
    tcp = socket.create_connection((proxy_host, proxy_port), timeout=5)
    buf.clear()
    tcp.sendall(codec.encode_request(Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0)))
    read_message(tcp, buf, codec.decode_auth_reply)
    read_message(tcp, buf, codec.decode_operation_reply)
    aid = read_message(tcp, buf, codec.decode_association_message).association_id  # type: ignore[attr-defined]
    tcp.sendall(datagram(aid, echo_host, echo_port, b"hello over TCP"))
    assert read_message(tcp, buf, codec.decode_association_message) == AssociationConfirmation(aid)
    message = read_message(tcp, buf, codec.decode_association_message)
    assert isinstance(message, Datagram)
    print("over TCP from", message.header.address, message.header.port, message.payload)
    tcp.close()  # ends the association (UDP-07)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    try:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    except OSError as exc:
        raise SystemExit(f"udp_associate_raw: {exc}") from None
