"""The CLI forgives: global options anywhere, help from the command table, shell completion, tables and
progress plain through a pipe and drawn on a terminal, events pushed by the controller (events-wait), long
operations followed from their events."""

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest
import yaml

from services.controller import cli
from services.controller.commands import COMMANDS, EMPTY, SUCCESS, dispatch
from services.controller.io_loop import Controller
from support import PYTHON, ROOT, wait_for

BOOTFLEET = str(ROOT / ".venv" / "bin" / "bootfleet")
PROBE = str(ROOT / "tests" / "bus" / "probe_service.py")
ESC = "\x1b["


def run_piped(args, env=None):
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)


def run_in_pty(args, env=None, timeout=60.0):
    """Run with stdout and stderr on a pseudo-terminal, as from an interactive shell: (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))  # rows, columns: a roomy terminal
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", **(env or {})}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; output so far {out!r}"
        if select.select([master], [], [], left)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    os.close(master)
    return proc.wait(timeout=10), out.decode(errors="replace")


# -- global options -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "before, after",
    [
        (["--json", "status"], ["status", "--json"]),
        (["--state-dir", "/x", "--timeout", "3", "events", "--type", "dhcp"], ["events", "--type", "dhcp", "--timeout", "3", "--state-dir", "/x"]),
        (["--json", "config", "get", "boot"], ["config", "get", "boot", "--json"]),
        (["--timeout", "2", "service", "scale", "tftp", "2"], ["service", "scale", "tftp", "2", "--timeout", "2"]),
    ],
)
def test_global_options_anywhere_on_the_line(before, after):
    a, b = vars(cli.parse_args(before)), vars(cli.parse_args(after))
    assert a == b
    plain = vars(cli.parse_args(["status"]))
    assert (plain["json"], plain["state_dir"], plain["timeout"]) == (False, cli.STATE_DIR, 10.0)


def test_an_option_after_the_command_is_not_a_usage_error(tmp_path):
    out = run_piped([BOOTFLEET, "status", "--json", "--state-dir", str(tmp_path), "--timeout", "1"])
    assert out.returncode == 1 and "the controller is not running" in out.stderr, out.stderr


# -- help is the command table ------------------------------------------------------------------------
def _subcommand_helps(parser, prefix=()):
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for choice in action._choices_actions:
            yield prefix + (choice.dest,), choice.help
        for name, sub in action.choices.items():
            yield from _subcommand_helps(sub, prefix + (name,))


def test_help_of_each_command_is_its_list_commands_summary():
    helps = dict(_subcommand_helps(cli.build_parser()))
    mapping = {
        ("status",): "status-get", ("events",): "events-list", ("clients",): "client-list", ("client",): "client-get",
        ("leases",): "lease-list", ("config", "apply"): "config-apply", ("config", "set"): "config-set",
        ("config", "get"): "config-get", ("service", "restart"): "service-restart", ("service", "scale"): "service-scale",
        ("lease", "release"): "lease-release",
    }
    for path, name in mapping.items():
        assert helps[path] == COMMANDS[name].summary, path
    assert helps[("config", "test")].startswith(COMMANDS["config-test"].summary)
    shown = " ".join(run_piped([BOOTFLEET, "--help"]).stdout.split())
    assert COMMANDS["status-get"].summary in shown and COMMANDS["client-get"].summary in shown


# -- shell completion ---------------------------------------------------------------------------------
def _complete(line: str) -> list[str]:
    script = run_piped([BOOTFLEET, "completion", "bash"])
    assert script.returncode == 0 and "complete " in script.stdout
    bash = f"""
source /dev/stdin <<'EOF'
{script.stdout}
EOF
COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}; read -ra COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_python_argcomplete bootfleet
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", bash], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return sorted(w.strip() for w in out.stdout.split("\n") if w.strip())


def test_completion_script_completes_commands_and_choices():
    assert "status" in _complete("bootfleet sta")
    words = _complete("bootfleet service restart ")
    assert [w for w in words if not w.startswith("-")] == ["dhcp", "iscsi_target", "tftp"]
    assert "--state-dir" in words  # the global options complete after the command too
    assert "--follow" in _complete("bootfleet events --fo")


# -- a running controller for the output tests ----------------------------------------------------------
@pytest.fixture
def running(procs, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "bootfleet.yaml"
    config.write_text(yaml.safe_dump({"bus": {"heartbeat_interval": 0.2},
                                      "clients": [{"mac": "52:54:00:00:00:01", "name": "pc-with-a-long-name"},
                                                  {"mac": "52:54:00:00:00:02", "name": "pc2"}]}))
    procs.start([PYTHON, "-m", "services.controller", "--config", str(config), "--state-dir", str(state)],
                log=state / "controller.log")
    wait_for(lambda: run_piped([BOOTFLEET, "--state-dir", str(state), "status"]).returncode == 0, timeout=30,
             what="controller answering")
    return state


@pytest.mark.integration
def test_tables_are_plain_through_a_pipe_and_drawn_on_a_terminal(running):
    piped = run_piped([BOOTFLEET, "clients", "--state-dir", str(running)])
    assert piped.returncode == 0 and ESC not in piped.stdout, piped.stdout
    header, *rows = piped.stdout.splitlines()
    assert header.split() == ["mac", "name", "ip", "target", "state", "last", "boot", "last", "seen"]
    starts = [m.start() for m in re.finditer(r"(?<!\S)\S", header)]
    for row in rows:  # aligned: every column starts where its header does
        assert all(row[s - 1] == " " and row[s] != " " for s in (starts[1], starts[2])), (header, row)
    code, shown = run_in_pty([BOOTFLEET, "clients", "--state-dir", str(running)])
    assert code == 0 and ESC in shown and "pc-with-a-long-name" in shown, shown
    # status through a pipe: no escapes either
    status = run_piped([BOOTFLEET, "--state-dir", str(running), "status"])
    assert status.returncode == 0 and ESC not in status.stdout and "revision" in status.stdout


PROGRESS = """
import sys
from services.controller.cli_progress import ProgressBar
with ProgressBar("copy demo.img", total=1000) as bar:
    for i in range(100):
        bar.advance(10)
"""


def test_progress_is_a_line_per_tenth_through_a_pipe_and_a_bar_on_a_terminal():
    env = {"PYTHONPATH": str(ROOT)}
    piped = run_piped([PYTHON, "-c", PROGRESS], env=env)
    assert piped.returncode == 0 and ESC not in piped.stderr
    lines = piped.stderr.splitlines()
    assert lines == [f"copy demo.img: {p}% ({p * 10} B of 1000 B)" for p in range(10, 100, 10)] + ["copy demo.img: 100% (1000 B)"]
    assert piped.stdout == ""  # progress goes to stderr: stdout stays data
    percent = run_piped([PYTHON, "-c", "from services.controller.cli_progress import ProgressBar\n"
                         "with ProgressBar('import', total=100, unit='%') as bar:\n    bar.update(35)\n    bar.update(100)"], env=env)
    assert percent.stderr.splitlines() == ["import: 30%", "import: 100%"], percent.stderr
    code, shown = run_in_pty([PYTHON, "-c", PROGRESS], env=env)
    assert code == 0 and ESC in shown and "copy demo.img" in shown and "10% (" not in shown, shown


# -- events-wait: pushed, not polled --------------------------------------------------------------------
@pytest.fixture
def controller(tmp_path):
    c = Controller(tmp_path / "state", None)
    c.sent = []
    c.reply = lambda envelope, answer: c.sent.append((envelope, answer))
    yield c
    c.close()


def _msg(type, **fields):
    return {"service": "probe", "instance": 0, "pid": 1, "ts": time.time(), "type": type, "fields": fields}


def test_events_wait_is_held_until_a_matching_event_is_filed(controller, monkeypatch):
    controller._store([_msg("probe.old")])
    last = controller.events.query(limit=1)[0]["id"]
    queries = []
    real = controller.events.query
    monkeypatch.setattr(controller.events, "query", lambda **q: queries.append(q) or real(**q))
    assert dispatch(controller.facade, [b"cli"], "events-wait", {"after_id": last, "type": "probe.ping", "wait": 5}) is None
    held = len(queries)
    for _ in range(20):  # turns of the loop with nothing new: nothing is asked of the store
        controller._expire(time.time())
        controller._store([])
    controller._store([_msg("dhcp.discover", mac="52:54:00:00:00:01")])  # a type the watch does not want
    assert len(queries) == held and controller.sent == []
    controller._store([_msg("probe.ping", n=1)])
    [(envelope, answer)] = controller.sent
    assert envelope == [b"cli"] and answer["result"] == SUCCESS
    assert [e["fields"] for e in answer["arguments"]["events"]] == [{"n": 1}]
    assert answer["arguments"]["last_id"] == answer["arguments"]["events"][-1]["id"]


def test_events_wait_answers_empty_at_its_deadline_and_at_once_when_events_are_there(controller):
    assert dispatch(controller.facade, [b"a"], "events-wait", {"after_id": 0, "wait": 1}) is None
    controller._expire(time.time() + 0.5)
    assert controller.sent == []
    controller._expire(time.time() + 1.5)
    [(_, answer)] = controller.sent
    assert answer["result"] == EMPTY and answer["arguments"] == {"events": [], "last_id": 0}
    controller._store([_msg("probe.ping", n=2)])
    now = dispatch(controller.facade, [b"b"], "events-wait", {"after_id": 0, "wait": 5})
    assert now["result"] == SUCCESS and now["arguments"]["events"][0]["fields"] == {"n": 2}


def test_events_wait_for_one_operation_skips_the_others(controller):
    assert dispatch(controller.facade, [b"a"], "events-wait", {"after_id": 0, "type": "operation", "op": "b", "wait": 5}) is None
    controller._store([_msg("operation.progress", op="a", name="x", done=1, total=2)])
    assert controller.sent == []
    controller._store([_msg("operation.progress", op="b", name="x", done=1, total=2)])
    [(_, answer)] = controller.sent
    assert [e["fields"]["op"] for e in answer["arguments"]["events"]] == ["b"]


def test_a_controller_operation_files_its_own_progress_events(controller):
    from shared.events import OperationFinished

    controller.emit(OperationFinished(op="c1", name="image-import", ok=True, text="imported"))
    [row] = controller.events.query(type="operation")
    assert row["service"] == "controller" and row["fields"] == {"op": "c1", "name": "image-import", "ok": True, "text": "imported"}


# -- a long operation followed from its events ------------------------------------------------------------
@pytest.mark.integration
def test_bootfleet_operation_follows_progress_to_the_end(running, procs, tmp_path):
    script = [["operation.progress", {"op": "op1", "name": "lun-resync", "done": d, "total": 4 << 20, "unit": "bytes"}, 0.05]
              for d in range(0, (4 << 20) + 1, 1 << 19)]
    script.append(["operation.finished", {"op": "op1", "name": "lun-resync", "ok": True, "text": "lun 0 in sync"}, 0.05])
    script.append(["operation.finished", {"op": "op2", "name": "lun-resync", "ok": False, "text": "leg b: no such file"}, 0.05])
    events = tmp_path / "events.json"
    events.write_text(json.dumps(script))
    follow = subprocess.Popen([BOOTFLEET, "--state-dir", str(running), "operation", "op1", "--from-start", "--within", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.start([PYTHON, PROBE, "--state-dir", str(running), "--instance", "0"], env={"PROBE_EVENTS": str(events)},
                log=running / "probe.log")
    out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    assert out.strip() == "lun 0 in sync"
    lines = err.splitlines()
    assert lines[0] == "operation op1: 10% (512.0 KiB of 4.0 MiB)" and lines[-1] == "operation op1: 100% (4.0 MiB): lun 0 in sync", lines
    failed = run_piped([BOOTFLEET, "--state-dir", str(running), "operation", "op2", "--from-start", "--within", "30"])
    assert failed.returncode == 1 and "bootfleet: lun-resync op2: leg b: no such file" in failed.stderr, failed.stderr
