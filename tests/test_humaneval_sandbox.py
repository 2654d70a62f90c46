"""HumanEval's sandbox against hostile programs (issue 21): each probe's payload runs through
run_program, and the test asserts it was stopped or harmless, on this machine as it is (root in
CI). Payloads that try something and carry on end with check(add): if they pass, they ran to
the end, so the attempt was made and failed."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import qsim
from qsim.config import ConfigError, compose_config, validate
from qsim.tasks import humaneval
from qsim.tasks.humaneval import SandboxError, run_program

RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
CHECK = "\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n"
TIMEOUT = 3.0


def _comm(token: str) -> str:
    return "qp" + token[:12]  # a process name (15 chars at most) every descendant inherits


def _named(comm: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                pids.append(int(entry))
        except OSError:
            pass
    return pids


@pytest.fixture
def token():
    """A name for this probe's processes; any left behind are reported by the test, then killed."""
    value = secrets.token_hex(8)
    yield value
    for pid in _named(_comm(value)):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _named_prologue(token: str) -> str:
    return f"import ctypes\nctypes.CDLL(None).prctl(15, b{_comm(token)!r}, 0, 0, 0)\n"


def _run(code: str, timeout: float = TIMEOUT):
    t0 = time.monotonic()
    outcome = run_program(textwrap.dedent(code), timeout)
    return outcome, time.monotonic() - t0


# --- the pass rule

def test_a_right_program_passes_and_a_wrong_one_fails():
    assert _run(RIGHT + CHECK)[0] == (True, "")
    assert _run(WRONG + CHECK)[0] == (False, "AssertionError")


@pytest.mark.parametrize("exit_call", ["import os; os._exit(0)", "raise SystemExit(0)"], ids=["os._exit", "SystemExit"])
def test_forged_exit_after_a_wrong_return_fails(exit_call):
    outcome, _ = _run(WRONG + exit_call + "\n" + CHECK)
    assert outcome == (False, "exited before its checks finished (no end marker)")


def test_output_after_the_marker_fails_and_a_printing_program_passes():
    assert _run(RIGHT + "print('chatty', end='')\n" + CHECK)[0] == (True, "")
    assert _run(RIGHT + CHECK + "import atexit; atexit.register(print, 'late')\n")[0][0] is False


# --- processes: none outlives run_program

FORK_SLEEPER = """
import os, time
if os.fork() == 0:
    {setsid}
    time.sleep(60)
    os._exit(0)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("setsid", ["", "os.setsid()"], ids=["forked-child", "setsid-child"])
def test_a_forked_child_does_not_outlive_the_timeout(setsid, token):
    outcome, took = _run(_named_prologue(token) + FORK_SLEEPER.format(setsid=setsid), timeout=1.0)
    assert outcome == (False, "timeout") and took < 1.0 + 2.0
    assert _named(_comm(token)) == []


DAEMON = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the daemon keeps stdout and stderr open
        {body}
    os._exit(0)
os.wait()
time.sleep(0.2)
"""


def test_a_double_forked_daemon_holding_the_pipes_does_not_turn_a_pass_into_a_timeout(token):
    outcome, took = _run(_named_prologue(token) + DAEMON.format(body="time.sleep(60)") + RIGHT + CHECK)
    assert outcome == (True, "") and took < 2.0
    assert _named(_comm(token)) == []


def test_a_daemon_writing_into_the_temp_dir_during_cleanup_cannot_crash_the_run(token):
    body = "i = 0\n        while True:\n            i += 1\n            open(f'f{i % 500}', 'w').write('x' * 100)"
    outcome, _ = _run(_named_prologue(token) + DAEMON.format(body=body) + RIGHT + CHECK)
    assert outcome == (True, "")
    assert _named(_comm(token)) == []


# --- reach: files, environment, network, processes

def _attempt(action: str) -> str:
    """A payload that tries `action` and fails only if it worked."""
    return RIGHT + "import os\ntry:\n" + textwrap.indent(textwrap.dedent(action), "    ") + \
        "\nexcept Exception:\n    pass\nelse:\n    raise SystemError('it worked')\n" + CHECK


def test_no_write_outside_the_private_folder(tmp_path):
    target = tmp_path / "outside.txt"
    assert _run(_attempt(f"open({str(target)!r}, 'w').write('x')"))[0] == (True, "")
    assert not target.exists()
    # its own folder works
    assert _run(RIGHT + "open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'\n" + CHECK)[0] == (True, "")


def test_no_write_into_the_parents_cwd_through_proc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run(_attempt("open(f'/proc/{os.getppid()}/cwd/planted.txt', 'w').write('x')"))[0] == (True, "")
    assert not (tmp_path / "planted.txt").exists()
    assert os.listdir(tmp_path) == []


def test_no_write_into_the_installed_qsim_package(token):
    target = Path(qsim.__file__).parent / f"planted_{token}.py"
    try:
        assert _run(_attempt(f"open({str(target)!r}, 'w').write('raise SystemExit')"))[0] == (True, "")
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_no_read_of_the_checkout_or_the_installed_packages():
    readme = Path(qsim.__file__).resolve().parent.parent / "README.md"
    assert readme.is_file()
    assert _run(_attempt(f"open({str(readme)!r}).read()"))[0] == (True, "")
    assert _run(_attempt(f"open({str(Path(qsim.__file__).resolve())!r}).read()"))[0] == (True, "")
    assert _run(_attempt("import torch"))[0] == (True, "")


def test_no_read_of_the_home_dir():
    with tempfile.NamedTemporaryFile("w", dir=Path.home(), prefix=".qsim-probe-") as secret:
        secret.write("secret")
        secret.flush()
        name = os.path.basename(secret.name)
        assert _run(_attempt(f"open({secret.name!r}).read()"))[0] == (True, "")
        assert _run(_attempt(f"assert {name!r} in os.listdir({str(Path.home())!r})"))[0] == (True, "")


def test_no_read_of_the_parents_environment(monkeypatch):
    monkeypatch.setenv("QSIM_PROBE_SECRET", "hunter2")
    leak = """
    seen = b''
    for pid in ['self', str(os.getppid())] + [p for p in os.listdir('/proc') if p.isdigit()]:
        try:
            seen += open(f'/proc/{pid}/environ', 'rb').read()
        except OSError:
            pass
    seen += repr(dict(os.environ)).encode()
    assert b'PATH=' in seen or b'hunter2' in seen or b"'PATH'" in seen
    """
    assert _run(_attempt(leak))[0] == (True, "")


def test_no_network_even_to_localhost():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()"
        assert _run(_attempt(connect))[0] == (True, "")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_no_signal_to_the_parent():
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    try:
        assert _run(_attempt("import signal\nos.kill(os.getppid(), signal.SIGUSR1)"))[0] == (True, "")
        assert _run(_attempt("import signal\nos.kill(1, signal.SIGUSR1)"))[0] == (True, "")
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert got == []


def test_process_count_is_bounded_even_as_root(token):
    spawn = """
    import time
    n = 0
    try:
        for _ in range(200):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
    except OSError:
        pass
    assert n >= 200
    """
    outcome, took = _run(_named_prologue(token) + _attempt(spawn))
    assert outcome == (True, "") and took < TIMEOUT
    assert _named(_comm(token)) == []


def test_disk_written_is_bounded_across_many_files():
    fill = """
    total = 0
    for i in range(22):  # 22 x 8 MiB = 176 MiB
        with open(f'fill{i}', 'wb') as f:
            f.write(b'x' * (8 << 20))
        total += 8 << 20
    """
    assert _run(_attempt(fill))[0] == (True, "")


def test_one_oversized_file_is_stopped():
    assert _run(_attempt("open('big', 'wb').write(b'x' * (32 << 20))"))[0] == (True, "")


def _rss_peak_reset() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _vm("VmHWM")


def _vm(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) << 10


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_an_output_flood_is_capped_and_fails(stream):
    flood = RIGHT + f"import sys\nfor _ in range(200):\n    sys.{stream}.write('x' * (1 << 20))\n" + CHECK
    before = _rss_peak_reset()
    outcome, took = _run(flood)
    assert outcome == (False, f"output over {humaneval.OUTPUT_LIMIT} bytes") and took < TIMEOUT
    assert _vm("VmHWM") - before < 32 << 20


def test_an_8_gib_allocation_fails():
    assert _run(_attempt("bytearray(8 << 30)"))[0] == (True, "")


def test_an_infinite_loop_times_out():
    outcome, took = _run(RIGHT + "while True:\n    pass\n" + CHECK, timeout=1.0)
    assert outcome == (False, "timeout") and took < 1.0 + 2.0


def test_open_files_and_core_dumps_are_limited():
    fds = "handles = [open('/dev/null') for _ in range(100000)]"
    assert _run(_attempt(fds))[0] == (True, "")
    core = """
    import resource
    assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
    if os.fork() == 0:
        os.abort()
    os.wait()
    assert not [f for f in os.listdir('.') if f.startswith('core')]
    """
    assert _run(RIGHT + "import os\n" + textwrap.dedent(core) + CHECK)[0] == (True, "")


# --- where the sandbox cannot be set up: refuse, unless the user opts in (recorded)

def _without_namespaces(code: str) -> subprocess.CompletedProcess:
    """Run code in an unmapped user namespace: namespaces cannot be made inside it."""
    return subprocess.run(["unshare", "--user", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_without_a_sandbox_programs_are_refused_unless_allowed():
    code = textwrap.dedent(f"""
        import json
        from qsim.tasks.humaneval import SandboxError, run_program, sandbox_problem
        try:
            run_program('pass', 3)
            refused = None
        except SandboxError as err:
            refused = str(err)
        print(json.dumps([sandbox_problem(), refused, run_program({RIGHT + CHECK!r}, 3, True),
                          run_program({WRONG + 'raise SystemExit(0)' + CHECK!r}, 3, True)]))
    """)
    run = _without_namespaces(code)
    assert run.returncode == 0, run.stderr[-2000:]
    problem, refused, right, forged = json.loads(run.stdout)
    assert problem and refused and "\n" not in refused and refused.startswith("no sandbox for generated code")
    assert right == [True, ""] and forged[0] is False


def test_cli_refuses_humaneval_without_a_sandbox_before_loading(tmp_path):
    args = ["model=tiny-codegen", "task=humaneval", "task.max_samples=1", "task.max_new_tokens=4", "progress=false",
            f"hydra.run.dir={tmp_path}"]
    run = subprocess.run(["unshare", "--user", sys.executable, "-m", "qsim.cli", "run", *args],
                         capture_output=True, text=True, timeout=120, cwd=Path(qsim.__file__).resolve().parent.parent)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "task.allow_unsandboxed=true" in lines[0]
    assert not (tmp_path / "result.json").exists()


def test_allow_unsandboxed_is_recorded_and_read_by_humaneval_only(tmp_path):
    run = subprocess.run(["unshare", "--user", sys.executable, "-m", "qsim.cli", "run", "model=tiny-codegen",
                          "task=humaneval", "task.max_samples=1", "task.max_new_tokens=4", "task.allow_unsandboxed=true",
                          "progress=false", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, cwd=Path(qsim.__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["config"]["task"]["allow_unsandboxed"] is True
    assert result["config_changes"]["task"]["allow_unsandboxed"] is True
    assert result["eval"]["sandbox"]["isolated"] is False and result["eval"]["sandbox"]["allow_unsandboxed"] is True
    with pytest.raises(ConfigError, match="read by task=humaneval only"):
        validate(compose_config(["model=tiny-opt", "task.allow_unsandboxed=true"]))


def test_the_sandbox_is_recorded():
    facts = humaneval.sandbox_facts()
    assert facts["isolated"] is True and {"pid", "net", "mount"} <= set(facts["namespaces"])
    assert facts["uid"] == (humaneval.SANDBOX_UID if os.geteuid() == 0 else "namespace root, no capabilities")
