"""`python -m minisgl --shell` end to end in a pseudo-terminal on CPU (issue 6, issue 21 item 7).

The model is conftest's `small_llama_dir` (stories260K's shape, random weights, context 512). It
has no chat template, so the shell runs in plain-continuation mode: the prompt is the running
transcript. Greedy sampling (the shell's default temperature 0) makes answers exact: the
expected ones come from `minisgl.LLM` on the same directory.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>>"
STATUS = r"\[(\d+) tokens, [\d.]+ tok/s\]"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
# prompt_toolkit turns bracketed paste off when it hands over an accepted line; the answer is
# written after it
ACCEPTED = "\x1b[?2004l"
ONCE = "Once upon a time"


@pytest.fixture(scope="module")
def model(small_llama_dir: str) -> str:
    return small_llama_dir


@pytest.fixture(scope="module")
def greedy_text(model: str):
    """fn(prompt, n): the greedy continuation the shell should print."""
    from minisgl import LLM, SamplingParams

    llm = LLM(model, device="cpu", dtype="float32")
    cache: dict[tuple[str, int], str] = {}

    def text(prompt: str, n: int) -> str:
        if (prompt, n) not in cache:
            params = SamplingParams(temperature=0.0, max_tokens=n)
            cache[prompt, n] = llm.generate([prompt], params, use_tqdm=False)[0]["text"]
        return cache[prompt, n]

    yield text
    llm.shutdown()


def spawn(model: str, *flags: str, ready: str = "plain-continuation mode"):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1")  # pexpect's pty answers no CPR queries
    p = pexpect.spawn(
        sys.executable, ["-m", "minisgl", "--model", model, "--device", "cpu", "--shell", *flags],
        encoding="utf-8", timeout=60, env=env, dimensions=(50, 400),
    )  # fmt: skip
    p.expect(ready)
    if ready == "plain-continuation mode":
        p.expect(PROMPT)
    return p


def ask(p, line: str, enter_later: bool = False) -> str:
    """Send one input; return the answer text (what the shell printed before its status line).

    The echo of the input is no boundary: prompt_toolkit draws the line once more when the
    text and the Enter arrive in separate reads (a loaded machine), so splitting at the first
    echo kept the redrawn one in the answer. The answer starts after ACCEPTED. `enter_later`
    sends the Enter 0.2 s after the text, which always makes that redraw.
    """
    if enter_later:
        p.send(line)
        time.sleep(0.2)
        p.send("\r")
    else:
        p.sendline(line)
    p.expect(STATUS)
    echo, accepted, answer = p.before.partition(ACCEPTED)
    assert accepted, f"no end of input in {p.before!r}"
    p.last_tokens = int(p.match.group(1))
    p.expect(PROMPT)
    return ANSI.sub("", answer).strip("\n")


def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_greedy_answer_reset_and_history(model, greedy_text):
    """The shell's answer is LLM's greedy continuation of the input; the same input again continues
    the growing transcript (another answer); after /reset it gives the first answer again, even when
    the input is drawn twice; /quit exits with status 0."""
    p = spawn(model, "--max-tokens", "32")
    try:
        a1 = ask(p, ONCE)
        assert a1 == greedy_text(ONCE, 32)
        # without /reset the transcript grows: the same input now continues the story
        a2 = ask(p, ONCE)
        assert a2 == greedy_text(f"{ONCE}{a1} {ONCE}", 32) and a2 != a1
        p.sendline("/reset")
        p.expect("history cleared")
        p.expect(PROMPT)
        a3 = ask(p, ONCE, enter_later=True)  # the input drawn twice: still the same answer
        assert a3 == a1
        p.sendline("/quit")
        p.expect(pexpect.EOF)
    finally:
        p.close(force=True)
    assert p.exitstatus == 0


def test_default_max_tokens_fit_and_history_overflow(model):
    """No --max-tokens on a 512-token model: answers of 128 tokens (a quarter), the oldest turns
    dropped once the transcript no longer fits, unknown commands answered with the help, an
    over-long input refused in one line, and nothing from the libraries on the terminal."""
    p = spawn(model)
    seen = p.before
    try:
        assert "answers up to 128" in seen
        dropped = 0
        for turn in range(6):
            answer = ask(p, f"{ONCE} {turn}")
            seen += answer
            assert "error" not in answer and p.last_tokens == 128, answer
            if "(context full: dropped the oldest turn" in answer:
                dropped += 1
        assert dropped >= 2  # three 128-token turns fill the 384 tokens left to the prompt
        p.sendline("/foo bar")
        p.expect(r"unknown command /foo; commands: /reset")
        p.expect(PROMPT)
        p.sendline("/reset")
        p.expect("history cleared")
        p.expect(PROMPT)
        p.sendline(f"{ONCE} " * 150)  # ~750 tokens: more than the whole context
        p.expect(r"error: .*context.*\n")
        seen += p.before + p.match.group(0)
        p.expect(PROMPT)
        p.sendline("/exit")
        p.expect(pexpect.EOF)
        seen += p.before
    finally:
        p.close(force=True)
    assert p.exitstatus == 0
    for noise in ("Token indices", "Warning", "warn(", "Traceback"):
        assert noise not in seen, noise


def test_max_tokens_beyond_the_context_is_refused(model):
    """--max-tokens 512 on a 512-token model is refused at start with a message that it leaves no
    room, exit status 2."""
    p = spawn(model, "--max-tokens", "512", ready="leaves no room")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 2


def test_ctrl_c_aborts_answer_and_exit_leaves_no_process(model, greedy_text):
    """Ctrl-C while an answer streams aborts it ("aborted after N tokens") and back at the prompt
    the aborted turn is not in the history: the next answer is the full greedy one; /exit ends the
    shell with status 0 and no worker process left within 10 s."""
    full = greedy_text(ONCE, 400)
    # 400 tokens stream in well under a second here; on a loaded machine the answer can end
    # before Ctrl-C arrives (it then exits at the empty prompt): retry with a fresh shell
    for _attempt in range(3):
        p = spawn(model, "--max-tokens", "400")
        p.sendline(ONCE)
        p.expect_exact(full[:8])  # the answer has started streaming
        p.sendcontrol("c")
        if p.expect([r"aborted after \d+ tokens", STATUS]) == 0:
            break
        p.expect(pexpect.EOF)
        p.close(force=True)
    else:
        pytest.fail("Ctrl-C never arrived while an answer was streaming")
    try:
        p.expect(PROMPT)
        # the aborted turn is not part of the history: the next answer is the greedy one
        assert ask(p, ONCE) == full
        kids = descendants(p.pid)
        assert len(kids) >= 3  # scheduler, detokenizer, tokenizer worker (+ resource tracker)
        p.sendline("/exit")
        p.expect(pexpect.EOF)
        deadline = time.monotonic() + 10
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k for k in kids if alive(k)]
    finally:
        p.close(force=True)
    assert p.exitstatus == 0


def test_ctrl_d_and_ctrl_c_at_prompt_exit(model):
    """Ctrl-D or Ctrl-C at an empty prompt exits the shell with status 0, and no worker process is
    left within 10 s."""
    for key in ("d", "c"):
        p = spawn(model, "--max-tokens", "8")
        try:
            kids = descendants(p.pid)
            p.sendcontrol(key)
            p.expect(pexpect.EOF)
        finally:
            p.close(force=True)
        assert p.exitstatus == 0
        deadline = time.monotonic() + 10
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k for k in kids if alive(k)]
