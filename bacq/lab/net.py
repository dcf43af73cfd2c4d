"""Network plumbing of the lab: a bridge, network namespaces with one veth each, a firewall rule.

Touches only what carries the lab's own names (bridge ``bacqlab<i>``, namespaces
``bacqlab<i>-<host>``, host-side veths ``bl<i>h<k>``) and addresses (10.213.<i>.0/24): the bridge
holds 10.213.<i>.1 in the root namespace, each namespace one address on it and no default route, so
traffic goes only between the lab's namespaces and the root namespace. Docker's firewall drops
bridged traffic it does not know (FORWARD policy DROP with br_netfilter), so one rule, tagged with a
comment naming the bridge, lets the bridge's own traffic through. Runs ``ip`` and ``iptables``
(root only).

Faults: ``cut``/``heal`` set a host's veth on the bridge down/up (the cable pulled: the host keeps
its address and its own loopback traffic, nothing crosses); ``cut_ports`` drops a host's TCP
traffic on some ports with rules inside its namespace (``ipfs``: its kubo's swarm only, the
worker stays on NATS); ``netem`` adds loss and latency with ``tc netem`` on both ends of a host's
veth. Whatever these add lives on the lab's own veths and namespaces, so it goes when they go.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time

from bacq.errors import ComponentError, ConfigError

__all__ = [
    "SUBNET",
    "bridge_down",
    "bridge_up",
    "cut_ports",
    "dropped_ports",
    "firewall_allow",
    "firewall_remove",
    "host_veths",
    "kill_namespace",
    "link_up",
    "namespace_down",
    "namespace_pids",
    "namespace_up",
    "namespaces",
    "netem",
    "netem_clear",
    "netem_show",
    "require_root",
    "set_link",
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


# -- faults ---------------------------------------------------------------------------------------
def set_link(veth: str, up: bool) -> None:
    """The host-side end of a host's veth up (healed) or down (cut off)."""
    _run("ip", "link", "set", veth, "up" if up else "down")


def link_up(veth: str) -> bool:
    """Whether the veth is administratively up (not cut)."""
    done = _run("ip", "-o", "link", "show", "dev", veth, check=False)
    if done.returncode != 0:
        return False
    flags = done.stdout.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in done.stdout else []
    return "UP" in flags


def _port_rules(port: int) -> list[list[str]]:
    tag = ["-m", "comment", "--comment", f"bacq lab cut {port}", "-j", "DROP"]
    return [
        ["INPUT", "-p", "tcp", "--dport", str(port), *tag],
        ["INPUT", "-p", "tcp", "--sport", str(port), *tag],
        ["OUTPUT", "-p", "tcp", "--dport", str(port), *tag],
        ["OUTPUT", "-p", "tcp", "--sport", str(port), *tag],
    ]


def _ns_iptables(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", "netns", "exec", ns, "iptables", *args, check=check)


def cut_ports(ns: str, ports: list[int], cut: bool) -> None:
    """Drop (``cut``) or let through again the TCP traffic of ``ports`` in namespace ``ns``, both
    ways (each rule once)."""
    for port in ports:
        for rule in _port_rules(port):
            exists = _ns_iptables(ns, "-C", *rule, check=False).returncode == 0
            if cut and not exists:
                _ns_iptables(ns, "-I", *rule)
            elif not cut:
                while exists:
                    _ns_iptables(ns, "-D", *rule)
                    exists = _ns_iptables(ns, "-C", *rule, check=False).returncode == 0


def dropped_ports(ns: str) -> list[int]:
    """The ports ``cut_ports`` drops in ``ns`` now."""
    listed = _ns_iptables(ns, "-S", check=False).stdout
    ports = {
        int(line.split('"bacq lab cut ', 1)[1].split('"', 1)[0])
        for line in listed.splitlines()
        if '"bacq lab cut ' in line
    }
    return sorted(ports)


def _netem_available() -> bool:
    return shutil.which("tc") is not None


def _loss_rules(loss: float) -> list[list[str]]:
    tag = ["-m", "comment", "--comment", f"bacq lab loss {loss:g}", "-j", "DROP"]
    random = ["-m", "statistic", "--mode", "random", "--probability", f"{loss / 100:.4f}"]
    return [["INPUT", *random, *tag], ["OUTPUT", *random, *tag]]


def netem(ns: str, veth: str, loss: float, delay_ms: float) -> str:
    """``loss`` percent of the packets lost and ``delay_ms`` added, each way, on one host; returns
    how: ``tc netem`` (a qdisc on the host-side veth, for traffic to the host, and one on the
    host's eth0, for traffic from it) or, where the kernel has no netem and only loss is asked
    for, ``iptables`` (random drops inside the namespace)."""
    if not 0 <= loss <= 100:
        raise ConfigError(f"--loss must be a percentage from 0 to 100, not {loss:g}")
    if not 0 <= delay_ms <= 60_000:
        raise ConfigError(f"--delay must be from 0 to 60000 ms, not {delay_ms:g}")
    if not loss and not delay_ms:
        raise ConfigError("netem needs --loss or --delay (or --clear to remove them)")
    params = ["netem"]
    if delay_ms:
        params += ["delay", f"{delay_ms:g}ms"]
    if loss:
        params += ["loss", f"{loss:g}%"]
    why = "`tc` is not installed (Debian: apt-get install iproute2)"
    if _netem_available():
        done = _run("tc", "qdisc", "replace", "dev", veth, "root", *params, check=False)
        if done.returncode == 0:
            _run("tc", "-n", ns, "qdisc", "replace", "dev", "eth0", "root", *params)
            _drop_loss_rules(ns)
            return "tc netem"
        why = f"`tc netem` failed: {done.stderr.strip()} (the kernel lacks sch_netem)"
    if delay_ms:
        raise ConfigError(
            f"--delay needs tc netem, and {why}; --loss alone works without it (iptables), "
            "and so do cut and heal"
        )
    netem_clear(ns, veth)
    for rule in _loss_rules(loss):
        _ns_iptables(ns, "-I", *rule)
    return "iptables"


def netem_clear(ns: str, veth: str) -> None:
    """Remove what ``netem`` added to this host (nothing there: nothing to do)."""
    if _netem_available():
        if " netem " in _run("tc", "qdisc", "show", "dev", veth, check=False).stdout:
            _run("tc", "qdisc", "del", "dev", veth, "root", check=False)
        shown = _run("tc", "-n", ns, "qdisc", "show", "dev", "eth0", check=False).stdout
        if " netem " in shown:
            _run("tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root", check=False)
    _drop_loss_rules(ns)


def _drop_loss_rules(ns: str) -> None:
    for line in _ns_iptables(ns, "-S", check=False).stdout.splitlines():
        if '"bacq lab loss ' in line and line.startswith("-A "):
            _ns_iptables(ns, "-D", *shlex.split(line)[1:], check=False)


def netem_show(ns: str, veth: str) -> str:
    """What ``netem`` set on this host (``delay 100ms loss 10%``, ``loss 10% (iptables)``) or
    ""."""
    if _netem_available():
        shown = _run("tc", "qdisc", "show", "dev", veth, check=False).stdout
        for line in shown.splitlines():
            if " netem " in line:
                words = line.split(" netem ", 1)[1].split()
                pairs = [
                    f"{w} {words[i + 1]}"
                    for i, w in enumerate(words[:-1])
                    if w in ("delay", "loss")
                ]
                return " ".join(pairs)
    for line in _ns_iptables(ns, "-S", check=False).stdout.splitlines():
        if '"bacq lab loss ' in line:
            return f"loss {line.split('bacq lab loss ', 1)[1].split(chr(34), 1)[0]}% (iptables)"
    return ""
