"""Client chat templates: rendered as transformers renders them, in a child
process bounded in time, output and memory (issue 19: one client's template
froze a whole worker)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.worker.templates import TemplateSandbox, compile_template, render

LOOP = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"}]
SIMPLE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
          "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_render_is_what_apply_chat_template_gives(tokenizer):
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert render(tokenizer.chat_template, MESSAGES, tokenizer.special_tokens_map,
                  10**6) == expected


def test_render_stops_at_the_output_bound():
    with pytest.raises(ValueError, match="more than 1000 characters"):
        render("{% for i in range(100000) %}0123456789{% endfor %}", MESSAGES, {}, 1000)


def test_a_template_that_does_not_parse_is_invalid_argument():
    with pytest.raises(InvalidArgument) as err:
        compile_template("{% for m in messages %}")
    assert err.value.field == "chat_template"
    compile_template(LOOP)   # parses: only running it is unbounded


def test_the_sandbox_renders_bounds_time_and_recovers():
    async def scenario():
        sandbox = TemplateSandbox(timeout_s=1.0, max_chars=10_000)
        try:
            assert await sandbox.render(SIMPLE, MESSAGES, {}) == (
                "<system>be brief<user>Hi<assistant>")
            started = time.monotonic()
            with pytest.raises(InvalidArgument) as err:
                await sandbox.render(LOOP, MESSAGES, {})
            took = time.monotonic() - started
            assert err.value.field == "chat_template" and "took more than 1 s" in err.value.message
            assert took < 5, took
            # the next render gets a fresh child
            assert await sandbox.render(SIMPLE, MESSAGES, {}) == (
                "<system>be brief<user>Hi<assistant>")
            with pytest.raises(InvalidArgument, match="more than 10000 characters"):
                await sandbox.render("{% for i in range(100000) %}0123456789{% endfor %}",
                                     MESSAGES, {})
            with pytest.raises(InvalidArgument, match="UndefinedError|raise|boom"):
                await sandbox.render("{{ raise_exception('boom') }}", MESSAGES, {})
            with pytest.raises(InvalidArgument, match="SecurityError|unsafe|access"):
                await sandbox.render("{{ messages.__class__.__mro__ }}", MESSAGES, {})
            assert sandbox.stats.timeouts == 1 and sandbox.stats.refused == 4
        finally:
            sandbox.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_the_loop_is_not_blocked_while_a_template_runs():
    async def scenario():
        sandbox = TemplateSandbox(timeout_s=1.5, max_chars=10_000)
        await sandbox.render(SIMPLE, MESSAGES, {})   # started
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            with pytest.raises(InvalidArgument):
                await sandbox.render(LOOP, MESSAGES, {})
        finally:
            ticker.cancel()
            sandbox.close()
        assert ticks > 50   # 1.5 s of 10 ms ticks: the loop kept running

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_the_sandbox_dies_with_its_worker(tmp_path):
    """A worker killed while a template loops leaves no child spinning."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        "import asyncio, sys\n"
        "from services.worker.templates import TemplateSandbox\n"
        f"LOOP = {LOOP!r}\n"
        "async def main():\n"
        "    sandbox = TemplateSandbox(timeout_s=120)\n"
        "    await sandbox.render('x', [], {})\n"
        "    print('CHILD', sandbox._process.pid, flush=True)\n"
        "    await sandbox.render(LOOP, [], {})\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n")
    root = Path(__file__).resolve().parents[3]
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    line = worker.stdout.readline()
    while not line.startswith("CHILD"):    # past the sandbox's own log lines
        line = worker.stdout.readline()
    child = int(line.split()[1])
    time.sleep(0.5)                              # the loop is running in the child
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as stat:   # a zombie waiting for init is gone too
            if stat.read().split(") ")[1].startswith("Z"):
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the sandbox's child outlived its worker")
