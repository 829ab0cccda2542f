"""Escape attempts against the tools, beyond tests/test_tools_python.py and test_tools_http_get.py.

python: lower-level routes to the network, to processes and to files than the obvious ones
(`_socket`, `_posixsubprocess`, `posix_spawn`, ctypes into libc, symlinks and hard links out of the
temp dir, /proc of the host), a memory bomb and a CPU spin. http_get: every spelling of loopback,
private, link-local (cloud metadata) and unspecified addresses, which must be refused even when
the spelling itself is what the allowlist names, unless the address is allowlisted.
"""

from __future__ import annotations

import os
import time

import pytest

from workers.tools.http_get import HttpGetRefused, UrlGuard
from workers.tools.python_sandbox import SandboxLimits, landlock_abi, run_python

FAST = SandboxLimits(timeout_s=10.0, memory_mb=256)
KERNEL_ONLY = SandboxLimits(timeout_s=3.0, memory_mb=256, audit_hook=False)

ATTEMPTS = r'''
import os, sys
def attempt(name, fn):
    try:
        r = fn()
        print(name, "ESCAPED", repr(r)[:60], flush=True)
    except BaseException as e:
        print(name, "refused", type(e).__name__, flush=True)

def raw_socket():
    import _socket
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    s.connect(("1.1.1.1", 80))
    return s

def posix_spawn():
    return os.posix_spawn("/bin/true", ["/bin/true"], {})

def fork_exec():
    import _posixsubprocess
    return _posixsubprocess.fork_exec(["/bin/true"], [b"/bin/true"], True, (), None, None, -1, -1, -1, -1, -1, -1,
                                      -1, -1, False, False, -1, None, None, None, -1, None, False)

def ctypes_fork():
    import ctypes
    return ctypes.CDLL(None).fork()

def symlink_out():
    os.symlink("/etc/passwd", "link")
    return open("link").read()

def hardlink_out():
    os.link("/etc/passwd", "hard")
    return open("hard").read()

def host_proc():
    return open("/proc/1/environ", "rb").read()

def home_listing():
    return os.listdir("/root")

def write_tmp():
    with open("/tmp/swarm-sandbox-escape", "w") as f:
        f.write("x")
    return "written"

for name, fn in [("raw_socket", raw_socket), ("posix_spawn", posix_spawn), ("fork_exec", fork_exec),
                 ("ctypes_fork", ctypes_fork), ("symlink_out", symlink_out), ("hardlink_out", hardlink_out),
                 ("host_proc", host_proc), ("home_listing", home_listing), ("write_tmp", write_tmp)]:
    attempt(name, fn)
'''
NAMES = ["raw_socket", "posix_spawn", "fork_exec", "ctypes_fork", "symlink_out", "hardlink_out", "host_proc",
         "home_listing", "write_tmp"]


@pytest.mark.parametrize("limits", [pytest.param(FAST, id="all-layers"), pytest.param(
    SandboxLimits(timeout_s=10.0, memory_mb=256, audit_hook=False), id="kernel-only",
    marks=pytest.mark.skipif(landlock_abi() < 6, reason="host kernel lacks Landlock ABI >= 6"))])
async def test_low_level_escape_routes_are_refused(limits: SandboxLimits) -> None:
    if os.path.exists("/tmp/swarm-sandbox-escape"):
        os.remove("/tmp/swarm-sandbox-escape")
    res = await run_python(ATTEMPTS, limits)
    seen = {line.split()[0]: line for line in res.stdout.splitlines() if line.split()}
    for name in NAMES:
        if limits.audit_hook is False and name == "ctypes_fork":
            continue  # a bare fork is not a kernel-layer matter; see the process-containment test below
        assert name in seen and " refused " in seen[name] + " ", res.render()
    assert not os.path.exists("/tmp/swarm-sandbox-escape")


async def test_memory_bomb_and_cpu_spin_are_stopped() -> None:
    res = await run_python("x = bytearray(1024 * 1024 * 1024)\nprint('allocated', len(x))", FAST)
    assert "allocated" not in res.stdout and "MemoryError" in res.stderr, res.render()
    t0 = time.monotonic()
    res = await run_python("while True:\n    pass", SandboxLimits(timeout_s=1.5, memory_mb=256))
    assert res.timed_out and time.monotonic() - t0 < 15, res.render()


async def test_fork_is_refused_so_nothing_outlives_the_tool() -> None:
    code = "import os\nfor i in range(100):\n    os.fork()\nprint('forked')"
    res = await run_python(code, FAST)
    assert "forked" not in res.stdout and "os.fork is not allowed" in res.stderr, res.render()


@pytest.mark.xfail(strict=True, reason=(
    "known gap: without the audit hook, a child that calls setsid() leaves the sandbox's process "
    "group, survives the group kill and holds the output pipe open, so the wall-time limit is not "
    "enforced (no PID namespace or cgroup contains the sandbox; RLIMIT_NPROC does not bind root)"))
async def test_kernel_layers_alone_contain_a_setsid_escape() -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    print('child', os.getpid(), flush=True)\n"
        "    time.sleep(8)\n"
        "    os._exit(0)\n"
        "time.sleep(8)\n"
    )
    t0 = time.monotonic()
    res = await run_python(code, KERNEL_ONLY)
    took = time.monotonic() - t0
    pids = [int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("child ")]
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
            os.kill(pid, 9)  # we started it: do not leave it behind
        except ProcessLookupError:
            pass
    assert res.timed_out and took < 7 and not alive, (took, alive)


# ---- http_get --------------------------------------------------------------------------------

INTERNAL_SPELLINGS = [
    "127.0.0.1", "127.0.0.2", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::1]", "[::ffff:127.0.0.1]",
    "0.0.0.0", "10.0.0.5", "172.16.3.4", "192.168.1.1", "169.254.169.254", "[fd00::1]", "[fe80::1]", "100.64.0.1",
]


@pytest.mark.parametrize("host", INTERNAL_SPELLINGS)
async def test_internal_addresses_refused_unless_the_address_is_allowlisted(host: str) -> None:
    # Even an allowlist that names the other spelling of the host must not open the internal address.
    name = host.strip("[]")
    guard = UrlGuard(["example.org", "127.1" if name != "127.1" else "2130706433"])
    with pytest.raises(HttpGetRefused):
        await guard.check(f"http://{host}/")
    if name in ("2130706433", "0x7f000001", "0177.0.0.1", "127.1"):
        # Names that resolve to loopback: allowlisting the name alone is not enough.
        with pytest.raises(HttpGetRefused, match="internal address"):
            await UrlGuard([name]).check(f"http://{host}/")


async def test_userinfo_and_backslash_tricks_do_not_change_the_host() -> None:
    guard = UrlGuard(["example.org"])
    for url in ["http://example.org@127.0.0.1/", "http://127.0.0.1\\@example.org/", "http://127.0.0.1#@example.org/",
                "http://127.0.0.1%2F@example.org/", "HTTP://127.0.0.1/"]:
        with pytest.raises(HttpGetRefused):
            await guard.check(url)

