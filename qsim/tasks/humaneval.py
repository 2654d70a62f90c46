"""HumanEval (164 Python problems): pass@1 in percent (higher is better).

Each problem's prompt (signature and docstring) is completed greedily through the KV cache
(at most task.max_new_tokens, cut at the Codex stop sequences), and the program
prompt + completion + the problem's tests + check(entry_point) runs in a sandbox.

Running generated code: this task, and only it, executes model output. A program passes only
if it ran to its end: after the program's last statement a runner prints a random per-run
marker, which must be the last line of stdout, with exit status 0 (`os._exit(0)` or
`SystemExit(0)` before the end fails). The marker lives in the program's own interpreter, so
a program written to search its memory for it could forge a pass; the sandbox bounds what
such a program can reach, not the score.

The sandbox (Linux namespaces and setuid, no extra tools): a launcher makes new mount, PID,
network, IPC, UTS and cgroup namespaces (as non-root, a user namespace first). The program
sees a read-only root holding only the system directories (/usr, /lib, ...), the Python
installation without any site-packages, a few /dev nodes, a /proc of its own PID namespace
and one writable folder, /tmp (its cwd: a 32 MiB tmpfs, 4096 files, noexec). It runs
`python -I -S` with an empty environment, no stdin, as uid/gid 65534 with no capabilities
and no_new_privs (as non-root: namespace root with every capability dropped), under limits on
CPU time, address space (4 GiB), file size (16 MiB), processes (64), open files (256) and
core files (none). It has no network (an empty network namespace) and sees neither the
parent's files (checkout, home, installed packages), nor its environment, nor its processes.
The launcher, outside the namespace, ends it at task.timeout: the program's init is killed
and reaped, which the kernel completes only after every process of the namespace is gone,
so nothing the program started outlives run_program. stdout and stderr are read with a cap
(1 MiB together; the program is stopped beyond it). When the sandbox cannot be set up,
programs are not run unless task.allow_unsandboxed=true (then only the limits, a session
and the marker apply; result.json's eval.sandbox says which ran).

pass@k is the unbiased estimator of the HumanEval paper (Chen et al. 2021, eq. 1):
1 - C(n-c, k) / C(n, k) for n samples of which c pass; greedy decoding gives n = 1.
"""
from __future__ import annotations

import functools
import glob
import inspect
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time

from .. import data
from ..config import ConfigError
from . import TASKS, Task, greedy_generate

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex's stop sequences
MEMORY_LIMIT = 4 << 30
SANDBOX_UID = 65534  # nobody
LIMITS = {"AS": MEMORY_LIMIT, "FSIZE": 16 << 20, "NPROC": 64, "NOFILE": 256, "CORE": 0}
WRITABLE = {"size": 32 << 20, "nr_inodes": 4096}  # the only writable folder (tmpfs)
OUTPUT_LIMIT = 1 << 20  # stdout + stderr bytes read from a program
TAIL = 16 << 10  # bytes kept of each stream (the marker and the error line are at the end)
GRACE = 5.0  # seconds past the timeout before the launcher itself is killed (it should end first)

# Runs the program so that the marker is printed only when its last statement finished.
_RUNNER = """\
import os, sys
def _run(fd):
    marker = os.read(fd, 64)
    os.close(fd)
    with open('program.py', encoding='utf-8') as f:
        code = compile(f.read(), 'program.py', 'exec')
    exec(code, {'__name__': '__main__', '__file__': 'program.py', '__builtins__': __builtins__})
    sys.stdout.flush()
    os.write(1, b'\\n' + marker + b'\\n')
_run(int(sys.argv[1]))
"""


class SandboxError(RuntimeError):
    """The sandbox failed to set up (not the program's fault); one line."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn from n (c of them correct) passes."""
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a stable product
        miss *= 1.0 - k / i
    return 1.0 - miss


def _sandbox_main():  # runs alone in `python -I -S -c`: stdlib only, every import inside
    import ctypes
    import json
    import os
    import resource
    import signal
    import sys
    import time

    cfg = json.loads(sys.stdin.buffer.read())
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    status = cfg["status_fd"]
    os.set_inheritable(status, False)  # closed at the program's exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

    def say(line):
        os.write(status, (line + "\n").encode())

    def check(what, rc):
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18

    def mount(src, dst, fstype, flags, options=None):
        enc = (lambda s: s.encode() if s is not None else None)
        check(f"mount {dst}", libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(options)))

    def prctl(option, value):
        check(f"prctl {option}", libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                                            ctypes.c_ulong(0)))

    as_root = os.geteuid() == 0
    try:
        if not as_root:  # a user namespace gives the mount rights; the uid stays the caller's outside
            uid, gid = os.geteuid(), os.getegid()
            check("unshare user", libc.unshare(0x10000000))
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        # mount, cgroup, uts, ipc, pid, net
        check("unshare", libc.unshare(0x20000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x20000000 | 0x40000000))
    except OSError as err:
        say(f"error {err.strerror or err}")
        os._exit(125)

    stops = [signal.SIGCHLD, signal.SIGTERM]
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    init = os.fork()  # pid 1 of the new pid namespace
    if init == 0:
        try:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with the launcher
            prctl(4, 0)  # not dumpable: the program cannot ptrace or read /proc/1
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            root = cfg["root"]
            mount(None, "/", None, REC | PRIVATE)  # nothing below propagates to the host
            mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,nr_inodes=4096,mode=0755")
            bound = []

            def bind(src, dst):
                mount(src, dst, None, BIND)
                locked = os.statvfs(src).f_flag & (NOEXEC | 1024 | 2048)  # a user namespace may not clear these
                mount(None, dst, None, BIND | REMOUNT | RDONLY | NOSUID | NODEV | locked)

            for name in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
                host = "/" + name
                if os.path.islink(host):
                    os.symlink(os.readlink(host), root + host)
                elif os.path.isdir(host):
                    os.mkdir(root + host)
                    bind(host, root + host)
                    bound.append(host + "/")
            for path in cfg["binds"]:  # the Python installation, where it is not under /usr
                if not any((path + "/").startswith(b) for b in bound):
                    os.makedirs(root + path, mode=0o755)
                    bind(path, root + path)
                    bound.append(path + "/")
            for path in cfg["hide"]:  # site-packages, home, checkout: an empty read-only folder over each
                if any((path + "/").startswith(b) for b in bound) and os.path.isdir(root + path):
                    mount("tmpfs", root + path, "tmpfs", NOSUID | NODEV | NOEXEC, "size=4k,nr_inodes=8,mode=0555")
                    mount(None, root + path, None, REMOUNT | RDONLY | NOSUID | NODEV | NOEXEC)
            os.mkdir(root + "/etc")
            for name in ("ld.so.cache", "localtime"):
                if os.path.isfile("/etc/" + name):
                    open(root + "/etc/" + name, "w").close()
                    bind("/etc/" + name, root + "/etc/" + name)
            os.mkdir(root + "/dev")
            mount("tmpfs", root + "/dev", "tmpfs", NOSUID | NOEXEC, "size=64k,nr_inodes=64,mode=0755")
            for name in ("null", "zero", "full", "random", "urandom"):
                open(root + "/dev/" + name, "w").close()
                mount("/dev/" + name, root + "/dev/" + name, None, BIND)
            for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                                 ("stderr", "/proc/self/fd/2")):
                os.symlink(target, root + "/dev/" + name)
            mount(None, root + "/dev", None, REMOUNT | RDONLY | NOSUID | NOEXEC)
            os.mkdir(root + "/proc")
            mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
            os.mkdir(root + "/tmp")
            w = cfg["writable"]
            mount("tmpfs", root + "/tmp", "tmpfs", NOSUID | NODEV | NOEXEC,
                  f"size={w['size']},nr_inodes={w['nr_inodes']},mode=0700")
            owner = (cfg["uid"], cfg["uid"]) if as_root else (0, 0)
            with open(root + "/tmp/program.py", "w", encoding="utf-8") as f:
                f.write(cfg["program"])
            os.chown(root + "/tmp", *owner)
            mount(None, root, None, REMOUNT | RDONLY | NOSUID | NODEV)
            os.chdir(root)
            arch = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(os.uname().machine)
            if arch is None:
                raise OSError(0, f"pivot_root: unknown architecture {os.uname().machine}")
            check("pivot_root", libc.syscall(arch, b".", b"."))
            check("umount old root", libc.umount2(b".", 2))  # MNT_DETACH: the host tree is gone from here
            os.chdir("/tmp")
            marker_r, marker_w = os.pipe()
            os.write(marker_w, cfg["marker"].encode())
            os.close(marker_w)
        except OSError as err:
            say(f"error {err.strerror or err}")
            os._exit(125)
        program = os.fork()
        if program == 0:
            try:
                if marker_r == 3:
                    os.set_inheritable(3, True)
                else:
                    os.dup2(marker_r, 3)  # inheritable
                for name, value in cfg["limits"].items():
                    resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
                if as_root:
                    os.setgroups([])
                    os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
                    os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # clears every capability
                else:
                    for cap in range(64):  # PR_CAPBSET_DROP until the kernel knows no more
                        if libc.prctl(24, ctypes.c_ulong(cap), 0, 0, 0) != 0:
                            break
                    prctl(28, 0x2F)  # securebits NOROOT, NO_SETUID_FIXUP, KEEP_CAPS, all locked: exec gives no caps
                prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
                os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-c", cfg["runner"], "3"], {})
            except OSError as err:
                say(f"error program: {err.strerror or err}")
            os._exit(125)
        os.close(marker_r)
        while True:  # reap orphans until the program ends; our exit then ends the namespace
            pid, st = os.waitpid(-1, 0)
            if pid == program:
                code = os.waitstatus_to_exitcode(st)
                os._exit(code if code >= 0 else 128 - code)

    # the launcher: ends the namespace at the timeout or when the parent asks (SIGTERM)
    deadline = time.monotonic() + cfg["timeout"]
    why, st = "exit", None
    while st is None:
        got = signal.sigtimedwait(stops, max(0.0, deadline - time.monotonic()))
        if got is None or got.si_signo == signal.SIGTERM:
            why = "timeout" if got is None else "stopped"
            os.kill(init, signal.SIGKILL)
            st = os.waitpid(init, 0)[1]  # returns once the kernel reaped every process of the namespace
        else:
            pid, got_st = os.waitpid(init, os.WNOHANG)
            if pid == init:
                st = got_st
    say(f"{why} {os.waitstatus_to_exitcode(st)}")
    os._exit(0)


@functools.lru_cache(maxsize=1)
def _launcher_code() -> str:
    return textwrap.dedent(inspect.getsource(_sandbox_main)) + "\n_sandbox_main()\n"


def _interpreter() -> tuple[str, list[str]]:
    """The real Python binary the program runs with (the base one, outside any venv) and the
    folders it needs: its prefixes (stdlib) and its own folder."""
    python = os.path.realpath(sys.executable)
    folders = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    if not any(python.startswith(f + "/") for f in folders):
        folders.add(os.path.dirname(python))
    return python, sorted(folders)


def _hidden() -> list[str]:
    """Folders the program must not see even where a bound tree holds them: every site-packages
    (installed qsim, torch, ...), the home and the working folder (a checkout)."""
    paths = set(glob.glob("/usr/lib/python3*/*-packages") + glob.glob("/usr/local/lib/python3*/*-packages"))
    for base in (sys.prefix, sys.base_prefix):
        for key in ("purelib", "platlib"):
            paths.add(sysconfig.get_paths(vars={"base": base, "platbase": base})[key])
    paths.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    # the checkout, home and cwd, unless inside the public system folders (a cwd of /usr/lib)
    paths.update(p for p in (os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             os.path.expanduser("~"), os.getcwd())
                 if not (os.path.realpath(p) + "/").startswith(("/usr/", "/bin/", "/sbin/", "/lib/", "/lib32/", "/lib64/")))
    python, folders = _interpreter()
    needed = [python] + folders  # never hide what runs the program (a home or cwd above it)
    return sorted(h for h in {os.path.realpath(p) for p in paths if p and os.path.isdir(p)}
                  if not any((n + "/").startswith(h + "/") for n in needed))


def _limits(timeout: float) -> dict:
    return {"CPU": int(timeout) + 1, **LIMITS}


def _drain(proc, streams: dict, deadline: float, stop, kill) -> tuple[dict, str | None]:
    """Read the pipes until all close, keeping each one's tail: output past OUTPUT_LIMIT calls
    stop(), the deadline kill(); a second later the pipes are given up (an escaped holder)."""
    tails = {name: bytearray() for name in streams}
    total, why, killed = 0, None, False
    with selectors.DefaultSelector() as sel:
        for name, f in streams.items():
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ, name)
        while sel.get_map():
            events = sel.select(max(0.0, deadline - time.monotonic()))
            if not events and time.monotonic() >= deadline:
                if killed:
                    break
                why, killed, deadline = why or "timeout", True, time.monotonic() + 1.0
                kill()
            for key, _ in events:
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                tail = tails[key.data]
                tail += chunk
                del tail[:-TAIL]
                if key.data != "status":
                    total += len(chunk)
                if total > OUTPUT_LIMIT and why is None:
                    why = f"output over {OUTPUT_LIMIT} bytes"
                    stop()
    return {name: bytes(t) for name, t in tails.items()}, why


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _end(proc) -> None:
    """Kill what is left of the process group and reap the launcher (every path)."""
    _kill_group(proc)
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def _verdict(code: int, out: bytes, err: bytes, marker: str) -> tuple[bool, str]:
    if code == 0 and out.rstrip(b"\n").rsplit(b"\n", 1)[-1] == marker.encode():
        return True, ""
    lines = err.decode("utf-8", "replace").strip().splitlines()
    if lines and code != 0:
        return False, lines[-1][:200]
    return False, f"exit status {code}" if code != 0 else "exited before its checks finished (no end marker)"


def _run_sandboxed(program: str, timeout: float) -> tuple[bool, str]:
    marker = secrets.token_hex(16)
    python, binds = _interpreter()
    # the mount point of the program's root; only the private mount namespace ever fills it
    with tempfile.TemporaryDirectory(prefix="qsim-humaneval-", ignore_cleanup_errors=True) as root:
        status_r, status_w = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _launcher_code()], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, pass_fds=(status_w,),
                                    start_new_session=True)
        finally:
            os.close(status_w)
        status = os.fdopen(status_r, "rb")
        try:
            cfg = {"status_fd": status_w, "root": root, "binds": binds, "hide": _hidden(), "python": python,
                   "program": program, "marker": marker, "timeout": timeout, "uid": SANDBOX_UID,
                   "limits": _limits(timeout), "writable": WRITABLE, "runner": _RUNNER}
            try:
                proc.stdin.write(json.dumps(cfg).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass

            def stop():
                try:
                    proc.send_signal(signal.SIGTERM)  # the launcher kills and reaps the namespace
                except ProcessLookupError:
                    pass

            tails, why = _drain(proc, {"out": proc.stdout, "err": proc.stderr, "status": status},
                                time.monotonic() + timeout + GRACE, stop, lambda: _kill_group(proc))
        finally:
            status.close()
            _end(proc)
    report = tails["status"].decode("utf-8", "replace").strip().splitlines()
    last = report[-1] if report else ""
    errors = [line[6:] for line in report if line.startswith("error ")]
    if errors or (not last and why is None):
        detail = errors[0] if errors else (tails["err"].decode("utf-8", "replace").strip().splitlines() or ["no report"])[-1]
        raise SandboxError(f"the HumanEval sandbox failed to start: {detail[:200]}")
    kind, _, code = last.partition(" ")
    if why is not None or kind != "exit":
        return False, why or "timeout"
    return _verdict(int(code), tails["out"], tails["err"], marker)


def _limit_resources(timeout: float):
    def apply():
        import resource

        for name, value in _limits(timeout).items():
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))

    return apply


def _run_unsandboxed(program: str, timeout: float) -> tuple[bool, str]:
    """Only limits, a session killed whole and the marker: the opt-in when namespaces are missing."""
    marker = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="qsim-humaneval-", ignore_cleanup_errors=True) as folder:
        with open(os.path.join(folder, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        marker_r, marker_w = os.pipe()
        os.write(marker_w, marker.encode())
        os.close(marker_w)
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _RUNNER, str(marker_r)], cwd=folder, env={},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(marker_r,), start_new_session=True, preexec_fn=_limit_resources(timeout))
        finally:
            os.close(marker_r)
        try:
            tails, why = _drain(proc, {"out": proc.stdout, "err": proc.stderr}, time.monotonic() + timeout,
                                lambda: _kill_group(proc), lambda: _kill_group(proc))
        finally:
            _end(proc)
    if why is not None:
        return False, why
    return _verdict(proc.returncode, tails["out"], tails["err"], marker)


@functools.lru_cache(maxsize=1)
def sandbox_problem() -> str | None:
    """Why the sandbox cannot run here (one line), or None: a trivial program must pass in it."""
    if sys.platform != "linux":
        return "namespaces need Linux"
    try:
        ok, why = _run_sandboxed("import os\nassert os.listdir('/tmp') == ['program.py']\n", 10.0)
    except (SandboxError, OSError) as err:
        return str(err)
    return None if ok else f"a trivial program failed in it ({why})"


def sandbox_facts(allow_unsandboxed: bool = False) -> dict:
    """What result.json records about the isolation generated code ran under."""
    problem = sandbox_problem()
    if problem is not None:
        return {"isolated": False, "allow_unsandboxed": allow_unsandboxed, "why": problem,
                "limits": LIMITS, "output_limit": OUTPUT_LIMIT}
    as_root = os.geteuid() == 0
    return {"isolated": True, "namespaces": (["user"] if not as_root else []) + ["mount", "pid", "net", "ipc", "uts", "cgroup"],
            "uid": SANDBOX_UID if as_root else "namespace root, no capabilities", "writable": {"/tmp": WRITABLE},
            "limits": LIMITS, "output_limit": OUTPUT_LIMIT}


def run_program(program: str, timeout: float, allow_unsandboxed: bool = False) -> tuple[bool, str]:
    """Run program in the sandbox: (passed, why not). Passing is exit status 0 with the run's
    marker as the last line of stdout. Without a sandbox: SandboxError, unless allow_unsandboxed."""
    problem = sandbox_problem()
    if problem is None:
        return _run_sandboxed(program, timeout)
    if not allow_unsandboxed:
        raise SandboxError(f"no sandbox for generated code: {problem}")
    return _run_unsandboxed(program, timeout)


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _check(cfg) -> None:
    data.check_available("humaneval", cfg.task.split)
    problem = sandbox_problem()
    if problem is not None and not cfg.task.allow_unsandboxed:
        raise ConfigError(f"task=humaneval runs model-written code and its sandbox cannot be set up here ({problem}); "
                          "set task.allow_unsandboxed=true to run it with limits only (recorded in result.json)")


def problems(split: str, max_samples: int | None) -> tuple[list[dict], int]:
    rows = data.load_records("humaneval", split)
    return (rows if max_samples is None else rows[:max_samples]), len(rows)


def _evaluate(lm, cfg, progress=None) -> dict:
    chosen, available = problems(cfg.task.split, cfg.task.max_samples)
    allow = bool(cfg.task.allow_unsandboxed)
    sandbox = sandbox_facts(allow)
    if progress is not None:
        progress.start(len(chosen))
    passed, tokens, generated, outcomes = 0, 0, 0, []
    for p in chosen:
        completion, n_prompt, n_new = greedy_generate(lm.model, lm.tokenizer, p["prompt"], cfg.task.max_new_tokens, STOP)
        ok, why = run_program(program(p, completion), cfg.task.timeout, allow)
        passed += ok
        tokens += n_prompt + n_new
        generated += n_new
        outcomes.append({"task_id": p["task_id"], "passed": ok, "error": why, "completion": completion})
        if progress is not None:
            progress.advance(1, f"passed {passed}")
    return {"value": 100.0 * sum(pass_at_k(1, int(o["passed"]), 1) for o in outcomes) / len(chosen),
            "passed": passed, "samples": len(chosen), "samples_available": available, "split": cfg.task.split,
            "tokens_evaluated": tokens, "tokens_generated": generated, "decoding": "greedy, n=1",
            "timeout_s": cfg.task.timeout, "sandbox": sandbox, "outcomes": outcomes}


TASKS["humaneval"] = Task("humaneval", "pass@1", _check, _evaluate, reads=lambda cfg: [("humaneval", cfg.task.split)],
                          higher_is_better=True, families=("code-lm", "causal-lm"))
