"""Network plumbing of the lab: a bridge, network namespaces with one veth each, a firewall rule.

Touches only what carries the lab's own names (bridge ``bacqlab<i>``, namespaces
``bacqlab<i>-<host>``, host-side veths ``bl<i>h<k>``) and addresses (10.213.<i>.0/24): the bridge
holds 10.213.<i>.1 in the root namespace, each namespace one address on it and no default route, so
traffic goes only between the lab's namespaces and the root namespace. Docker's firewall drops
bridged traffic it does not know (FORWARD policy DROP with br_netfilter), so one rule, tagged with a
comment naming the bridge, lets the bridge's own traffic through. Runs ``ip`` and ``iptables``
(root only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

from bacq.errors import ComponentError, ConfigError

__all__ = [
    "SUBNET",
    "bridge_down",
    "bridge_up",
    "firewall_allow",
    "firewall_remove",
    "host_veths",
    "kill_namespace",
    "namespace_down",
    "namespace_pids",
    "namespace_up",
    "namespaces",
    "require_root",
]

SUBNET = "10.213"  # the lab's own range: 10.213.<index>.0/24


def require_root() -> None:
    if os.geteuid() != 0:
        raise ConfigError(
            "the lab needs root (network namespaces, a bridge, a firewall rule): "
            "run it as root or with sudo"
        )
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            raise ConfigError(f"the lab needs `{tool}` (Debian: apt-get install iproute2 iptables)")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise ComponentError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done


def _link_exists(name: str, ns: str | None = None) -> bool:
    argv = ["ip", *(["-n", ns] if ns else []), "link", "show", "dev", name]
    return _run(*argv, check=False).returncode == 0


def bridge_up(bridge: str, address: str) -> None:
    """The bridge with ``address``/24 in the root namespace (made when missing)."""
    if not _link_exists(bridge):
        _run("ip", "link", "add", "name", bridge, "type", "bridge")
    addrs = _run("ip", "-o", "addr", "show", "dev", bridge).stdout
    if f" {address}/24 " not in addrs:
        _run("ip", "addr", "add", f"{address}/24", "dev", bridge)
    _run("ip", "link", "set", bridge, "up")


def bridge_down(bridge: str) -> None:
    if _link_exists(bridge):
        _run("ip", "link", "del", bridge)


def namespaces(prefix: str) -> list[str]:
    """The network namespaces whose names start with ``prefix``."""
    listed = _run("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def host_veths(prefix: str) -> list[str]:
    """The root namespace's links whose names start with ``prefix``."""
    listed = _run("ip", "-o", "link", "show").stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in listed.splitlines()]
    return [n for n in names if n.startswith(prefix)]


def namespace_up(ns: str, veth: str, bridge: str, address: str) -> None:
    """Namespace ``ns`` with lo and eth0 (``address``/24, the peer of ``veth`` on ``bridge``)."""
    if ns not in namespaces(ns):
        _run("ip", "netns", "add", ns)
    _run("ip", "-n", ns, "link", "set", "lo", "up")
    if not _link_exists("eth0", ns):
        if _link_exists(veth):
            _run("ip", "link", "del", veth)
        peer = f"{veth}p"
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", ns)
        _run("ip", "-n", ns, "link", "set", peer, "name", "eth0")
    addrs = _run("ip", "-n", ns, "-o", "addr", "show", "dev", "eth0").stdout
    if f" {address}/24 " not in addrs:
        _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    _run("ip", "-n", ns, "link", "set", "eth0", "up")
    _run("ip", "link", "set", veth, "master", bridge)
    _run("ip", "link", "set", veth, "up")


def namespace_pids(ns: str) -> list[int]:
    done = _run("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def kill_namespace(ns: str, grace: float = 15.0) -> list[int]:
    """SIGTERM every process in ``ns``, SIGKILL what is left after ``grace`` seconds."""
    pids = namespace_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while namespace_pids(ns) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in namespace_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while namespace_pids(ns) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def namespace_down(ns: str) -> None:
    """Delete ``ns`` (its eth0 goes with it, and so does the veth's other end)."""
    if ns in namespaces(ns):
        _run("ip", "netns", "del", ns)


def _rule(bridge: str) -> list[str]:
    return [
        "FORWARD",
        "-i",
        bridge,
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        f"bacq lab {bridge}",
        "-j",
        "ACCEPT",
    ]


def firewall_allow(bridge: str) -> None:
    """Let traffic between the bridge's ports through (once)."""
    if _run("iptables", "-C", *_rule(bridge), check=False).returncode != 0:
        _run("iptables", "-I", *_rule(bridge))


def firewall_remove(bridge: str) -> None:
    while _run("iptables", "-C", *_rule(bridge), check=False).returncode == 0:
        _run("iptables", "-D", *_rule(bridge))
