"""`python`: run model-written Python in a sandboxed subprocess and return its exit code and output.

Layers, outermost first (each one is checked by tests/test_tools_python.py):
- a separate process in its own session/process group, killed as a group on timeout, on an output
  flood and when the calling task is cancelled; stdin is /dev/null; a fresh temp dir as cwd and
  HOME, removed afterwards; environment reduced to a few variables; `python -I -B` (no user site,
  no PYTHON* variables, no bytecode writes);
- a fresh network namespace (`unshare --net`) where the host allows it: no interfaces, no loopback;
- a fresh PID namespace (`unshare --pid --fork --kill-child --mount-proc`) where the host allows it:
  the program is its init, so when it exits or is killed every descendant dies with it, whatever
  session or process group it moved to (setsid), and no outside process can be named;
- a cgroup `pids.max` where a pids cgroup hierarchy is writable (root): bounds forks and threads,
  which RLIMIT_NPROC cannot do for root; on timeout every member of the cgroup is killed too;
- a wall-time limit that does not depend on the output pipes closing: on the deadline everything
  is killed and reading stops after a short grace;
- kernel rlimits: address space (memory), CPU seconds, file size, open files, no core dumps;
- Linux Landlock where the kernel has it: reads only of the Python installation, system libraries
  and a few devices; reads and writes only inside the temp dir; no TCP bind/connect; no execve; no
  signals to processes outside the sandbox;
- a `sys.addaudithook` hook with friendly errors: refuses sockets, fork/exec/subprocess/spawn,
  signals to other processes, raising rlimits, ctypes foreign calls, opening/listing paths outside
  the allowed roots and writing outside the temp dir.
The audit hook alone is not a security boundary against hostile code (pure-Python hooks can be
worked around); the namespace, rlimits and Landlock are enforced by the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from pydantic import BaseModel, Field

from workers.tools.registry import Tool, ToolContext

MAX_STREAM_CHARS = 8_000  # kept per stream; the two together stay under the registry's 20k cap
FLOOD_BYTES = 4_000_000  # total output after which the child is killed
MAX_CODE_CHARS = 100_000
_READ_CHUNK = 65_536


class PythonArgs(BaseModel):
    code: str = Field(
        min_length=1,
        max_length=MAX_CODE_CHARS,
        description=(
            "A complete Python 3.11 program. Print what you want to see; if the last line is an "
            "expression its value is printed too. Standard library and numpy are available. "
            "No network, no subprocesses, files only in the current (temporary) directory."
        ),
    )


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 512
    max_file_mb: int = 64
    max_open_files: int = 256
    # Processes plus threads the program may hold at once (enforced where a pids cgroup is writable).
    max_processes: int = 64
    # The audit-hook layer; tests switch it off to check the kernel layers on their own.
    audit_hook: bool = True


@dataclass
class SandboxResult:
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    flooded: bool = False
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    layers: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"exit code {self.exit_code if self.exit_code is not None else 'none'}"]
        if self.timed_out:
            lines.append("killed: the wall-time limit was exceeded")
        if self.flooded:
            lines.append(f"killed: more than {FLOOD_BYTES} bytes of output")
        out = self.stdout.rstrip("\n") + (f"\n[... {self.stdout_dropped} more bytes of stdout dropped]" if self.stdout_dropped else "")
        err = self.stderr.rstrip("\n") + (f"\n[... {self.stderr_dropped} more bytes of stderr dropped]" if self.stderr_dropped else "")
        lines.append("stdout:" + ("\n" + out if out else " (empty)"))
        lines.append("stderr:" + ("\n" + err if err else " (empty)"))
        return "\n".join(lines)


# Runs inside the child before the user's code. Trusted; takes its settings as JSON in argv[1].
_BOOTSTRAP = r'''
import sys, os, json, resource, ast, traceback, builtins
cfg = json.loads(sys.argv[1])
tmp = cfg["tmp"]
if cfg["pidns"] and os.getpid() == 1:
    # PID namespace init: the kernel shields init from its namespace's signals, so the program runs
    # as its child instead; init reaps orphans and, when the program ends, records its status and
    # exits, which makes the kernel kill whatever else is left in the namespace.
    program = os.fork()
    if program != 0:
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                os._exit(1)
            if pid == program:
                code = os.waitstatus_to_exitcode(status)
                with open(cfg["status_file"], "w") as f:
                    f.write(str(code))
                os._exit(0)
os.chdir(tmp)
with open(cfg["code_file"], encoding="utf-8") as f:
    source = f.read()

def _limits():
    mem = cfg["mem_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["fsize"], cfg["fsize"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["nofile"], cfg["nofile"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _landlock():
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs_all = (1 << 13) - 1
    if abi >= 2: fs_all |= 1 << 13
    if abi >= 3: fs_all |= 1 << 14
    if abi >= 5: fs_all |= 1 << 15
    net = 0b11 if abi >= 4 else 0
    scoped = 0b11 if abi >= 6 else 0
    if abi >= 6: attr = struct.pack("=QQQ", fs_all, net, scoped)
    elif abi >= 4: attr = struct.pack("=QQ", fs_all, net)
    else: attr = struct.pack("=Q", fs_all)
    buf = ctypes.create_string_buffer(attr, len(attr))
    rfd = libc.syscall(444, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if rfd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    READ_FILE, READ_DIR, WRITE_FILE, TRUNCATE = 1 << 2, 1 << 3, 1 << 1, 1 << 14
    file_bits = 1 | WRITE_FILE | READ_FILE | (TRUNCATE if abi >= 3 else 0) | ((1 << 15) if abi >= 5 else 0)
    def allow(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if not os.path.isdir(path):
                access &= file_bits
            access &= fs_all
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
            if libc.syscall(445, ctypes.c_int(rfd), ctypes.c_int(1), rule, ctypes.c_uint32(0)) != 0:
                raise OSError(ctypes.get_errno(), "landlock_add_rule " + path)
        finally:
            os.close(fd)
    for p in cfg["read_roots"]:
        allow(p, READ_FILE | READ_DIR)
    for p in cfg["rw_files"]:
        allow(p, READ_FILE | WRITE_FILE)
    allow(tmp, fs_all & ~1)  # everything but execute
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required to self-restrict
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.syscall(446, ctypes.c_int(rfd), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(rfd)
    return abi

_limits()
_abi = _landlock() if cfg["landlock"] else 0
if cfg["report_layers"]:
    print("landlock-abi", _abi, file=sys.stderr)

def _install_hook(
    tmp=os.path.realpath(tmp),
    read_roots=tuple(os.path.realpath(p) for p in cfg["read_roots"]),
    rw_files=frozenset(os.path.realpath(p) for p in cfg["rw_files"]),
    realpath=os.path.realpath, fsdecode=os.fsdecode, getpid=os.getpid,
    isinstance=isinstance, str=str, bytes=bytes, int=int, tuple=tuple, PermissionError=PermissionError,
    WRITE_FLAGS=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
):
    sep = os.sep
    def under(p, root):
        return p == root or p.startswith(root + sep)
    def resolve(p):
        if p is None:
            p = "."
        if isinstance(p, bytes):
            p = fsdecode(p)
        return realpath(p)
    def may_read(p):
        return under(p, tmp) or p in rw_files or any(under(p, r) for r in read_roots)
    def may_write(p):
        return under(p, tmp) or p in rw_files
    def deny(what):
        raise PermissionError("sandbox: " + what + " is not allowed")
    forbidden = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "pty.spawn", "resource.setrlimit", "resource.prlimit", "ctypes.dlsym", "ctypes.dlsym/handle",
        "ctypes.call_function", "ctypes.cdata", "sqlite3.enable_load_extension", "sys.unraisablehook",
        "os.setxattr", "os.removexattr", "os.chown",
    ))
    # _posixsubprocess stays importable (subprocess, ctypes.util import it); Landlock forbids execve.
    forbidden_modules = frozenset(("_xxsubinterpreters", "_xxinterpchannels"))
    path_writes = frozenset(("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.utime", "os.truncate", "os.chflags", "os.lchflags"))
    def hook(event, args):
        if event.startswith("socket."):
            deny("network access (" + event + ")")
        if event in forbidden:
            deny(event)
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            p = resolve(path)
            writing = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)
            if writing and not may_write(p):
                deny("writing " + p + " (only the current directory " + tmp + " is writable)")
            if not writing and not may_read(p):
                deny("reading " + p + " (outside the sandbox)")
        elif event in ("os.listdir", "os.scandir"):
            if args and isinstance(args[0], int):
                return
            p = resolve(args[0] if args else None)
            if not may_read(p):
                deny("listing " + p + " (outside the sandbox)")
        elif event == "os.chdir":
            if isinstance(args[0], int) or not under(resolve(args[0]), tmp):
                deny("changing directory outside " + tmp)
        elif event in path_writes:
            if args and not isinstance(args[0], int) and not may_write(resolve(args[0])):
                deny(event + " outside " + tmp)
        elif event in ("os.rename", "os.link"):
            for a in args[:2]:
                if not may_write(resolve(a)):
                    deny(event + " of " + resolve(a))
        elif event == "os.symlink":
            if not may_write(resolve(args[1])):
                deny("os.symlink outside " + tmp)
        elif event in ("os.kill", "os.killpg"):
            if args[0] != getpid():
                deny("sending signals to other processes")
        elif event == "import":
            if args[0] in forbidden_modules:
                deny("importing " + args[0])
        elif event == "sqlite3.connect":
            db = args[0]
            if db not in (":memory:", b":memory:", "") and not may_write(resolve(db)):
                deny("opening a database outside " + tmp)
        elif event == "object.__setattr__":
            if args[1] in ("__code__", "__defaults__", "__kwdefaults__") and id(args[0]) in protected:
                deny("patching the sandbox")
    protected = frozenset(map(id, (hook, under, resolve, may_read, may_write, deny, _install_hook)))
    sys.addaudithook(hook)

if cfg["audit"]:
    _install_hook()
try:
    tree = ast.parse(source, filename="<sandbox>")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    ns = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(tree, "<sandbox>", "exec"), ns)
    if last is not None:
        value = eval(compile(last, "<sandbox>", "eval"), ns)
        if value is not None:
            print(repr(value))
except SystemExit:
    raise
except BaseException as e:
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<sandbox>":
        tb = tb.tb_next
    traceback.print_exception(type(e), e, tb)
    sys.exit(1)
'''


def _python_read_roots() -> list[str]:
    """What the interpreter needs to read for imports: its stdlib, site-packages and system libraries."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots |= {os.path.join(p, "lib") for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}}
    roots |= {"/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", "/usr/share/zoneinfo",
              "/dev/urandom", "/dev/zero", "/proc/cpuinfo", "/sys/devices/system/cpu"}
    return sorted(p for p in roots if os.path.exists(p))


_unshare_path: str | None = None
_unshare_ok: bool | None = None
_landlock_abi: int | None = None


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel (0 when absent); the child applies the same one."""
    global _landlock_abi
    if _landlock_abi is None:
        _landlock_abi = 0
        if sys.platform.startswith("linux"):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) returns the ABI.
            _landlock_abi = max(0, int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))))
    return _landlock_abi


_PIDNS_FLAGS = ["--pid", "--fork", "--kill-child", "--mount-proc"]
_unshare_flags: list[str] | None = None


async def _unshare_ok_with(exe: str, flags: list[str]) -> bool:
    try:
        proc = await asyncio.create_subprocess_exec(
            exe, *flags, "true", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return (await proc.wait()) == 0
    except OSError:
        return False


async def _namespace_flags() -> list[str]:
    """The `unshare` flags this host allows (needs root or user namespaces); probed once per process.

    Prefers a network plus PID namespace, falls back to the network namespace alone, else none.
    """
    global _unshare_ok, _unshare_path, _unshare_flags
    if _unshare_flags is None:
        exe = _unshare_path = shutil.which("unshare")
        flags: list[str] = []
        if exe is not None:
            for candidate in (["--net", *_PIDNS_FLAGS], ["--net"]):
                if await _unshare_ok_with(exe, candidate):
                    flags = candidate
                    break
        _unshare_flags = flags
        _unshare_ok = "--net" in flags
    return _unshare_flags


async def _netns_available() -> bool:
    """Whether `unshare --net` works here; checked once per process."""
    return "--net" in await _namespace_flags()


_CGROUP_CANDIDATES = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")  # cgroup v1 pids hierarchy, then v2
_cgroup_base: str | None = None
_cgroup_probed = False


def _pids_cgroup_base() -> str | None:
    """A cgroup directory under which we may create children with `pids.max`; None when there is none."""
    global _cgroup_base, _cgroup_probed
    if not _cgroup_probed:
        _cgroup_probed = True
        for base in _CGROUP_CANDIDATES:
            probe = os.path.join(base, f"swarm-py-probe-{os.getpid()}")
            try:
                os.mkdir(probe)
            except OSError:
                continue
            try:
                with open(os.path.join(probe, "pids.max"), "w") as f:
                    f.write("8")
                _cgroup_base = base
                break
            except OSError:
                continue
            finally:
                with contextlib.suppress(OSError):
                    os.rmdir(probe)
    return _cgroup_base


def _make_pids_cgroup(name: str, max_pids: int) -> str | None:
    base = _pids_cgroup_base()
    if base is None:
        return None
    path = os.path.join(base, name)
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_pids))
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        return None
    return path


def _kill_cgroup(path: str | None, spare: int | None = None) -> None:
    """SIGKILL every member of the cgroup but `spare` (one pass; members cannot leave it on their own)."""
    if path is None:
        return
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        return
    for pid in pids:
        if pid != spare:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


async def _remove_cgroup(path: str | None) -> None:
    """Kill what is left in the cgroup and remove it; the kernel refuses while members remain."""
    if path is None:
        return
    for _ in range(100):
        _kill_cgroup(path)
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            await asyncio.sleep(0.02)


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (the `children` file, else a scan of every stat)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        pass
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
    return found


def _kill_group(proc: asyncio.subprocess.Process, cgroup: str | None = None, pidns: bool = False) -> None:
    """SIGKILL everything the sandbox started.

    With a PID namespace the namespace's init (the launcher's child) is killed first, so the kernel
    kills every process in the namespace and the launcher reaps init and exits by itself: nothing
    is left for the host's init to reap. Without one the process group and the cgroup are killed.
    """
    if pidns and proc.returncode is None:
        for child in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
        _kill_cgroup(cgroup, spare=proc.pid)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    _kill_cgroup(cgroup)


async def _kill_and_reap(proc: asyncio.subprocess.Process, cgroup: str | None, pidns: bool) -> None:
    """Kill everything, then wait for the launcher; if it lingers, kill it and the group outright."""
    _kill_group(proc, cgroup, pidns)
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=2.0)
    except TimeoutError:
        _kill_group(proc, cgroup, pidns=False)
        await proc.wait()


async def run_python(
    code: str,
    limits: SandboxLimits = SandboxLimits(),
    *,
    on_start: Callable[[int], None] | None = None,
    report_layers: bool = False,
) -> SandboxResult:
    """Run `code` in the sandbox. Cancelling the awaiting task kills the child's process group.

    `on_start(pid)` is called once the child runs (for monitoring). With `report_layers` the child
    prints the Landlock ABI it applied to stderr first (for tests).
    """
    if not code.strip():
        raise ValueError("code is empty")
    if limits.timeout_s <= 0 or limits.memory_mb < 32:
        raise ValueError("timeout_s must be > 0 and memory_mb >= 32")
    if limits.max_processes < 2:
        raise ValueError("max_processes must be >= 2 (the launcher and the program)")
    tmp = tempfile.mkdtemp(prefix="swarm-py-")
    proc: asyncio.subprocess.Process | None = None
    cgroup: str | None = None
    pidns = False
    try:
        code_file = os.path.join(tmp, "main.py")
        Path(code_file).write_text(code, encoding="utf-8")
        cfg = {
            "tmp": tmp,
            "code_file": code_file,
            "mem_bytes": limits.memory_mb * 1024 * 1024,
            "cpu_s": max(1, math.ceil(limits.timeout_s)) + 1,
            "fsize": limits.max_file_mb * 1024 * 1024,
            "nofile": limits.max_open_files,
            "read_roots": _python_read_roots(),
            "rw_files": ["/dev/null"],
            "landlock": sys.platform.startswith("linux"),
            "audit": limits.audit_hook,
            "report_layers": report_layers,
            "pidns": False,
            "status_file": os.path.join(tmp, ".exit-status"),
        }
        layers = ["process-group", "rlimits"]
        ns_flags = await _namespace_flags()
        cfg["pidns"] = pidns = "--pid" in ns_flags
        argv = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOTSTRAP, orjson.dumps(cfg).decode()]
        if ns_flags:
            argv = [str(_unshare_path), *ns_flags, "--"] + argv
            layers.append("netns")
            if pidns:
                layers.append("pidns")
        cgroup = _make_pids_cgroup(os.path.basename(tmp), limits.max_processes)
        if cgroup is not None:
            # The shell joins the cgroup, then execs the launcher: everything after it is counted.
            procs = os.path.join(cgroup, "cgroup.procs")
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs] + argv
            layers.append("pids-cgroup")
        if cfg["landlock"] and landlock_abi() > 0:
            layers.append(f"landlock-abi-{landlock_abi()}")
        if limits.audit_hook:
            layers.append("audit-hook")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "Agg",
        }
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp,
            env=env,
            start_new_session=True,  # own process group, so one killpg reaches everything it started
        )
        if on_start is not None:
            on_start(proc.pid)
        result = await _collect(proc, limits.timeout_s, cgroup, pidns)
        result.layers = layers
        if pidns:
            # `unshare` reports its child (our init), not the program: take the status init recorded.
            try:
                result.exit_code = int(Path(cfg["status_file"]).read_text())
            except (OSError, ValueError):
                result.exit_code = -signal.SIGKILL if result.timed_out or result.flooded else result.exit_code
        return result
    finally:
        # Also reached on CancelledError: kill first, then reap, then remove the cgroup and directory.
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(_kill_and_reap(proc, cgroup, pidns))
            with contextlib.suppress(Exception):
                await asyncio.shield(_remove_cgroup(cgroup))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


async def _collect(
    proc: asyncio.subprocess.Process, timeout_s: float, cgroup: str | None = None, pidns: bool = False
) -> SandboxResult:
    assert proc.stdout is not None and proc.stderr is not None
    kept = {"out": bytearray(), "err": bytearray()}
    dropped = {"out": 0, "err": 0}
    total = 0
    flooded = asyncio.Event()

    async def pump(name: str, stream: asyncio.StreamReader) -> None:
        nonlocal total
        while True:
            chunk = await stream.read(_READ_CHUNK)
            if not chunk:
                return
            total += len(chunk)
            room = MAX_STREAM_CHARS * 4 - len(kept[name])  # bytes; cut to characters after decoding
            kept[name].extend(chunk[: max(room, 0)])
            dropped[name] += max(0, len(chunk) - max(room, 0))
            if total > FLOOD_BYTES:
                flooded.set()
                _kill_group(proc, cgroup, pidns)
                return

    timed_out = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pumps = asyncio.gather(pump("out", proc.stdout), pump("err", proc.stderr))
    try:
        await asyncio.wait_for(asyncio.shield(pumps), timeout=timeout_s)
        # Output closed; the process may still run (it could close its pipes and loop on).
        await asyncio.wait_for(proc.wait(), timeout=max(0.05, deadline - loop.time()))
    except TimeoutError:
        timed_out = not flooded.is_set()
        await _kill_and_reap(proc, cgroup, pidns)
    except BaseException:
        pumps.cancel()
        raise
    await proc.wait()
    if not pumps.done():
        # Everything is killed, so the pipes normally reach EOF at once; if some process still holds
        # them (a host without PID namespace or cgroup), stop reading rather than wait on it.
        try:
            await asyncio.wait_for(asyncio.shield(pumps), timeout=0.5)
        except TimeoutError:
            pumps.cancel()
            with contextlib.suppress(BaseException):
                await pumps
            # Close our ends of the pipes now; asyncio.subprocess.Process exposes no public way to.
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
    out, out_extra = _cut(bytes(kept["out"]), dropped["out"])
    err, err_extra = _cut(bytes(kept["err"]), dropped["err"])
    return SandboxResult(
        exit_code=proc.returncode,
        stdout=out,
        stderr=err,
        timed_out=timed_out,
        flooded=flooded.is_set(),
        stdout_dropped=out_extra,
        stderr_dropped=err_extra,
    )


def _cut(data: bytes, dropped: int) -> tuple[str, int]:
    text = data.decode("utf-8", errors="replace")
    if len(text) > MAX_STREAM_CHARS:
        extra = len(text[MAX_STREAM_CHARS:].encode("utf-8", errors="replace"))
        return text[:MAX_STREAM_CHARS], dropped + extra
    return text, dropped


def make_python_tool(timeout_s: float = 10.0, memory_mb: int = 512) -> Tool:
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)

    async def python_tool(args: PythonArgs, ctx: ToolContext) -> str:
        return (await run_python(args.code, limits)).render()

    return Tool(
        name="python",
        description=(
            "Run a Python 3.11 program in an isolated sandbox and get back its exit code, stdout and "
            f"stderr. Limits: {timeout_s:g} s wall time, {memory_mb} MB memory, no network, no "
            "subprocesses, only the temporary current directory is readable/writable (it is deleted "
            "afterwards, so nothing persists between calls). Print the results you need. Use it for "
            "data processing, exact computation and checking code."
        ),
        args_model=PythonArgs,
        fn=python_tool,
    )
