"""Delay every packet of a netfilter queue by a fixed time: `tc netem delay` for kernels built without netem.

    ip netns exec NS iptables -A OUTPUT -o IFACE -j NFQUEUE --queue-num N --queue-bypass
    ip netns exec NS python tests/netdelay.py N 20

The kernel hands each packet that matches the rule to this process (over netlink, NFQUEUE) and holds it until
this process gives its verdict; the verdict (accept) comes `delay` ms after the packet arrived, in arrival order,
so the stream keeps its order and gains a fixed latency. With `--queue-bypass`, packets pass untouched while no
process listens. Runs until SIGTERM; prints "ready" once bound. Linux netlink, standard library only.
"""

from __future__ import annotations

import heapq
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2


def attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def message(kind: int, queue: int, attributes: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attributes
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body


def packet_ids(data: bytes) -> list[int]:
    """The ids of the queued packets in one netlink read (it may hold several messages)."""
    ids, offset = [], 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            position = offset + 20  # nlmsghdr + nfgenmsg
            while position + 4 <= offset + length:
                attr_length, attr_kind = struct.unpack_from("=HH", data, position)
                if attr_length < 4:
                    break
                if attr_kind & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, position + 4)[0])
                position += (attr_length + 3) & ~3
        elif kind == NLMSG_ERROR:
            error = struct.unpack_from("=i", data, offset + 16)[0]
            if error != 0:
                raise OSError(-error, f"netlink error {os.strerror(-error)}")
        offset += (length + 3) & ~3
    return ids


def main() -> None:
    queue, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.send(message(NFQNL_MSG_CONFIG, queue, attribute(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0)),
                      NLM_F_REQUEST | NLM_F_ACK))
    packet_ids(sock.recv(65536))
    sock.send(message(NFQNL_MSG_CONFIG, queue, attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
                      NLM_F_REQUEST | NLM_F_ACK))
    packet_ids(sock.recv(65536))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print("ready", flush=True)
    due: list[tuple[float, int]] = []
    while not stopping:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else 0.5
        readable, _, _ = select.select([sock], [], [], timeout)
        now = time.monotonic()
        if readable:
            for packet in packet_ids(sock.recv(1 << 20)):
                heapq.heappush(due, (now + delay, packet))
        while due and due[0][0] <= time.monotonic():
            _, packet = heapq.heappop(due)
            sock.send(message(NFQNL_MSG_VERDICT, queue, attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT,
                                                                                             packet))))
    for _, packet in due:  # let what is held go before leaving
        sock.send(message(NFQNL_MSG_VERDICT, queue, attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT,
                                                                                         packet))))


if __name__ == "__main__":
    main()
