"""Repeated log records are one line and a count per interval (`klein_agent.logs.RepeatFilter`), for every logger
the installed handler serves. In-process with a fake clock, and one real process."""

from __future__ import annotations

import logging
import subprocess
import sys

from klein_agent.logs import RepeatFilter
from tests.http_helpers import REPO


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def records(logger: str, message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(logger, logging.ERROR, __file__, 1, message, args, info)


def test_one_line_per_kind_per_interval_then_a_count() -> None:
    clock = Clock()
    summaries: list[logging.LogRecord] = []
    repeats = RepeatFilter(summaries.append, interval_s=10.0, clock=clock)

    def passed(record: logging.LogRecord) -> bool:
        return repeats.filter(record)

    # 1000 of one kind (the argument differs, the template does not), and a second kind beside it
    assert [passed(records("asyncio", "accept failed on fd %d", n)) for n in range(1000)].count(True) == 1
    assert passed(records("asyncio", "accept failed on fd %d", 1, exc=OSError(24, "Too many open files")))
    assert passed(records("uvicorn.error", "accept failed on fd %d", 1))  # another logger: another kind
    assert not summaries
    clock.now += 10.0
    assert not passed(records("asyncio", "accept failed on fd %d", 5))  # a new interval counts again
    assert [s.getMessage() for s in summaries] == [
        "accept failed on fd 0 (repeated 999 times in the last 10 s)"
    ]
    clock.now += 10.0
    repeats.flush()  # at exit: the count of the interval still open
    assert summaries[-1].getMessage() == "accept failed on fd 0 (repeated 1 times in the last 10 s)"
    clock.now += 10.0
    assert passed(records("asyncio", "accept failed on fd %d", 6))  # quiet for an interval: afresh


def test_the_installed_handler_rate_limits_every_logger() -> None:
    code = (
        "import logging, sys\n"
        "from klein_agent.logs import configure_logging\n"
        "configure_logging('INFO')\n"
        "for n in range(500):\n"
        "    logging.getLogger('asyncio').error('socket.accept() out of system resource %d', n)\n"
        "    logging.getLogger('klein_agent.http').warning('%d connections open', n)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert done.returncode == 0 and len(lines) == 4, done.stderr  # per kind: the first, and the count at exit
    assert "repeated 499 times" in lines[2] and "repeated 499 times" in lines[3]
    assert "out of system resource 0" in lines[0] + lines[2] and done.stdout == ""


def under_a_host(level: str, script: str, line_format: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in a fresh process after setting up a host logger 'host' as Serve sets its own: at `level`, not
    propagating, writing `line_format` lines to stdout."""
    setup = (
        "import logging, sys\n"
        "host = logging.getLogger('host')\n"
        "host.propagate = False\n"
        f"host.setLevel(logging.{level})\n"
        "out = logging.StreamHandler(sys.stdout)\n"
        f"out.setFormatter(logging.Formatter({line_format!r}))\n"
        "host.addHandler(out)\n"
    )
    command = [sys.executable, "-c", setup + script]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_our_records_can_go_to_a_hosts_logger_once_each_and_rate_limited() -> None:
    """`forward_ours`, as a Ray Serve replica uses it: our INFO lines reach the host's logger (Serve's, which
    writes the replica's log file) and only it, once even when set twice, repeats counted, DEBUG left out."""
    code = (
        "from klein_agent.logs import forward_ours\n"
        "forward_ours(host)\n"
        "forward_ours(host)\n"
        "log = logging.getLogger('klein_agent.replica')\n"
        "log.debug('not at INFO')\n"
        "for n in range(300):\n"
        "    log.info('call %d: its caller cancelled it', n)\n"
        "log.warning('a model warning')\n"
    )
    done = under_a_host("INFO", code, "HOST %(name)s %(levelname)s %(message)s")
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and done.stderr == "", done.stderr  # nothing through the root or last resort
    assert lines[:2] == [
        "HOST klein_agent.replica INFO call 0: its caller cancelled it",
        "HOST klein_agent.replica WARNING a model warning",
    ], lines
    assert len(lines) == 3 and lines[2].startswith(lines[0] + " (repeated 299 times in the last "), lines


def test_a_record_with_its_own_repeat_key_is_a_kind_of_its_own() -> None:
    """A line per call (`extra={"repeat_key": call}`) is never held back as a repeat of another call's line; the
    same call's line repeated still is."""
    repeats = RepeatFilter(lambda record: None, interval_s=10.0, clock=Clock())

    def keyed(key: str) -> logging.LogRecord:
        record = records("klein_agent.replica", "call %s: its caller cancelled it", key)
        record.repeat_key = key
        return record

    assert all(repeats.filter(keyed(f"call_{n}")) for n in range(50))
    assert not repeats.filter(keyed("call_7"))


def test_the_hosts_level_holds_and_configure_logging_takes_ours_back() -> None:
    """A host logger set to WARNING (Serve's `log_level`) gets none of our INFO lines; `configure_logging` after
    `forward_ours` sends ours to stderr again, and no longer to the host."""
    code = (
        "from klein_agent.logs import configure_logging, forward_ours\n"
        "forward_ours(host)\n"
        "log = logging.getLogger('klein_agent.replica')\n"
        "log.info('below the host level')\n"
        "log.warning('at the host level')\n"
        "configure_logging('INFO')\n"
        "log.info('back on stderr')\n"
    )
    done = under_a_host("WARNING", code, "HOST %(levelname)s %(message)s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["HOST WARNING at the host level"]
    assert done.stderr.splitlines()[-1].endswith("klein_agent.replica: back on stderr"), done.stderr
