"""A restarted node agent sends the tunnel a fresh ZDS snapshot naming pods the tunnel already serves: the
tunnel must keep their listeners and open connections (rebinding would reset every connection of the
pod — found by the privileged mesh test of agent restarts under traffic).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tunnel_harness import APP_PORT, ByteServer, cluster, connect_captured

from nodeagent.agent.zds_server import ZdsServer
from nodeagent.model import SocketAddress
from nodeagent.ztunnel.zds_client import Backoff


@pytest.fixture
def zds_path() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="tunnel-zds-", dir="/tmp")
    yield os.path.join(root, "ztunnel.sock")
    shutil.rmtree(root)


async def test_a_new_snapshot_for_a_served_pod_keeps_its_listeners_and_connections(
    tmp_path: Path, zds_path: str
) -> None:
    async with cluster(tmp_path) as c:
        server_pod = c.pod("server")
        assert server_pod.ip is not None
        netns_stand_in = os.open("/dev/null", os.O_RDONLY)
        zds = ZdsServer(lambda: [(server_pod, netns_stand_in)], zds_path)
        await zds.start()
        app = ByteServer(server_pod.ip, size=2).start()
        try:
            await c.wait_ready(await c.start_tunnel("node1"))
            fast = Backoff(0.01, 0.05)
            tunnel = await c.start_tunnel("node2", zds_socket=zds_path, zds_backoff=fast)
            await c.wait_ready(tunnel)
            listeners = list(tunnel._pods[server_pod.uid].listeners)

            loop = asyncio.get_running_loop()
            long = await connect_captured(c.net, c.pod("client"), SocketAddress(server_pod.ip, APP_PORT))
            await loop.sock_sendall(long, b"hi")
            assert await loop.sock_recv(long, 2)

            # The agent restarts: a new server on the same path, the tunnel reconnects and gets an Add again.
            await zds.close()
            zds = ZdsServer(lambda: [(server_pod, netns_stand_in)], zds_path)
            await zds.start()
            async with asyncio.timeout(5):
                while not zds.tunnels:  # noqa: ASYNC110 (polling the server's view of its peers)
                    await asyncio.sleep(0.01)
                while tunnel._zds is None or not tunnel._zds.synced:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)

            assert tunnel._pods[server_pod.uid].listeners == listeners  # the very same sockets
            assert all(sock.fileno() >= 0 for sock in listeners)
            await loop.sock_sendall(long, b"still there")  # the established connection carries on
            long.shutdown(socket.SHUT_WR)  # the app then finishes and closes
            async with asyncio.timeout(5):
                while await loop.sock_recv(long, 65536):
                    pass
            long.close()
            assert len(app.received) == 1 and app.received[0].nbytes == len(b"histill there")
            assert app.received[0].eof
        finally:
            await app.close()
            await zds.close()
            os.close(netns_stand_in)


async def test_a_pod_the_tunnel_refuses_leaves_no_netns_fd_behind(tmp_path: Path) -> None:
    """add_pod owns the netns fd it is given (on_add passes a dup of the ZDS one): a pod refused for an
    invalid identity (the ZDS codec accepts an empty service account) used to keep it open, pinning the
    netns, one more fd for every Add of every snapshot."""
    from nodeagent.zds.codec import Workload

    async with cluster(tmp_path) as c:
        tunnel = await c.start_tunnel("node2")
        fd = os.open("/dev/null", os.O_RDONLY)
        with pytest.raises(ValueError, match="service account"):
            await tunnel.add_pod(Workload("uid-bad", "web", "shop", ""), fd)
        with pytest.raises(OSError):  # closed: nothing else opened an fd in between
            os.fstat(fd)
