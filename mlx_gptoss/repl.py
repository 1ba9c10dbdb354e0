"""The interactive terminal chat behind ``mlx-gptoss chat`` (a thin loop over ChatSession).

A turn that fails prints one ``error: ...`` line and the chat goes on: the session has undone the
turn, so nothing of the conversation is lost.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .chat import ChatSession, Done
from .harmony import EFFORTS, CommentaryDelta, FinalDelta, ReasoningDelta, ToolCallCompleted, ToolCallStarted

HISTORY_FILE = Path.home() / ".cache" / "mlx-gptoss" / "chat_history"
BLOCK = '"""'

HELP = f"""commands:
  /reset               forget the conversation (keeps instructions and settings)
  /effort low|medium|high
  /reasoning           show or hide the reasoning
  /save FILE           save the conversation (harmony conversation JSON); asks before replacing a file
  /save! FILE          save it, replacing FILE without asking
  /load FILE           continue a saved conversation
  /help, /quit
keys:
  {BLOCK} on a line of its own starts a multi-line message; {BLOCK} again sends it
  Up/Down and Ctrl-R recall earlier lines (history in {HISTORY_FILE})
  Ctrl-C stops an answer (and keeps the chat); Ctrl-D or /quit leaves"""


class Repl:
    """The terminal chat over ``session``; ``adapter`` and ``loaded`` (the adapter applied, the file
    the conversation was loaded from) are named in the banner."""

    def __init__(self, session: ChatSession, *, show_reasoning: bool = True, options: dict[str, Any] | None = None,
                 read: Callable[[str], str] = input, out: TextIO | None = None, err: TextIO | None = None,
                 adapter: str | Path | None = None, loaded: str | Path | None = None):  # fmt: skip
        self.session, self.show_reasoning, self.options = session, show_reasoning, options or {}
        self.adapter, self.loaded = adapter, loaded
        # the streams of the moment, not those of import time (a caller may have replaced them since)
        self.read, self.out, self.err = read, out or sys.stdout, err or sys.stderr
        self.color = self.out.isatty()

    def _dim(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.color else text

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def banner(self) -> str:
        """``chat with MODEL (adapter AD; continuing FILE, N messages) — /help for commands``."""
        notes = [f"adapter {self.adapter}"] if self.adapter is not None else []
        if self.loaded is not None:
            notes.append(f"continuing {self.loaded}, {len(self.session.messages)} messages")
        extra = f" ({'; '.join(notes)})" if notes else ""
        return f"chat with {getattr(self.session.model, 'path', 'the model')}{extra} — /help for commands"

    def run(self) -> None:
        self.say(self.banner())
        while True:
            try:
                line = self.read(">>> ")
                block = line.strip() == BLOCK
                text = self._block() if block else line.strip()
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /quit to leave)")
                continue
            if not text.strip():
                continue
            if text.startswith("/") and not block:
                if self.command(text) == "quit":
                    return
                continue
            self.turn(text)

    def _block(self) -> str:
        """Lines up to the closing ``\"\"\"`` (EOF ends the block too), as one message."""
        lines = []
        while True:
            try:
                line = self.read("... ")
            except EOFError:
                break
            if line.rstrip().endswith(BLOCK):
                lines.append(line.rstrip()[: -len(BLOCK)])
                break
            lines.append(line)
        return "\n".join(lines).strip("\n")

    def command(self, line: str) -> str | None:
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return "quit"
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/reset":
            self.session.reset()
            self.say("(conversation cleared)")
        elif cmd == "/effort":
            if arg not in EFFORTS:
                self.say("usage: /effort low|medium|high")
            else:
                self.session.reasoning_effort = arg
                self.say(f"(reasoning effort: {arg})")
        elif cmd == "/reasoning":
            self.show_reasoning = not self.show_reasoning
            self.say(f"(reasoning {'shown' if self.show_reasoning else 'hidden'})")
        elif cmd in ("/save", "/save!"):
            if not arg:
                self.say(f"usage: {cmd} FILE")
            else:
                self._save(Path(arg).expanduser(), replace=cmd == "/save!")
        elif cmd == "/load":
            if not arg:
                self.say("usage: /load FILE")
            else:
                self._load(arg)
        else:
            self.say(f"unknown command {cmd} (/help)")
        return None

    def _load(self, arg: str) -> None:
        s = self.session
        try:
            payload = Path(arg).expanduser().read_text()
            # the settings stay; a file that cannot be used leaves the current conversation as it is
            self.session = ChatSession.from_json(s.model, payload, tools=list(s.tools.values()), context_policy=s.context_policy,
                                                 context=s.context_size, **s.defaults)  # fmt: skip
            self.say(f"(loaded {len(self.session.messages)} messages from {arg})")
        except (OSError, ValueError) as e:
            self.say(f"cannot load {arg}: {e}")
        except RecursionError:  # json's decoder recurses once per nesting level
            self.say(f"cannot load {arg}: not a saved conversation: it is nested too deeply")

    def _confirm(self, question: str) -> bool:
        try:
            return self.read(f"{question} [y/N] ").strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            self.say("")
            return False

    def _save(self, path: Path, *, replace: bool = False) -> None:
        """The conversation into ``path``, written beside it and renamed into place (a reader never
        sees half a file); an existing file is replaced only when ``replace`` or confirmed."""
        if path.is_dir():
            self.say(f"cannot save to {path}: it is a folder; give a file name")
            return
        if (path.exists() or path.is_symlink()) and not replace:
            if not self._confirm(f"{path} exists: replace it?"):
                self.say(f"(not saved; /save! {path} replaces it without asking)")
                return
        text, tmp = self.session.to_json(), None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(f.fileno(), 0o666 & ~umask)  # as open() would create it, not mkstemp's owner-only 0600
                f.write(text)
            os.replace(tmp, path)
            tmp = None
            self.say(f"(saved to {path})")
        except OSError as e:
            self.say(f"cannot save to {path}: {e.strerror or e}")
        finally:
            if tmp is not None:  # the write or the rename failed: no copy is left behind
                try:
                    os.unlink(tmp)
                except OSError:
                    pass  # already gone

    def turn(self, text: str) -> None:
        previous = signal.getsignal(signal.SIGINT)
        in_main = _in_main_thread()
        if in_main:
            signal.signal(signal.SIGINT, lambda *_: self.session.cancel())  # Ctrl-C stops this answer only
        shown_reasoning = False
        try:
            for ev in self.session.stream(text, **self.options):
                if isinstance(ev, ReasoningDelta) and self.show_reasoning:
                    self.out.write(self._dim(ev.text))
                    shown_reasoning = True
                elif isinstance(ev, (FinalDelta, CommentaryDelta)):
                    if shown_reasoning:
                        self.out.write("\n\n")
                        shown_reasoning = False
                    self.out.write(ev.text)
                elif isinstance(ev, ToolCallStarted):
                    self.out.write(self._dim(f"\n[calling {ev.name}] "))
                elif isinstance(ev, ToolCallCompleted):
                    self.out.write(self._dim(f"{ev.call.raw_arguments}\n"))
                elif isinstance(ev, Done):
                    self._stats(ev.reply)
                self.out.flush()
        except KeyboardInterrupt:
            self.say("\n(stopped; that message was not kept)")
        except Exception as e:  # noqa: BLE001 - the session undid the turn; the chat must go on
            self.say(f"\nerror: {e}")
        except BaseException as e:
            if type(e).__name__ != "PanicException":  # openai-harmony's Rust panics are BaseExceptions
                raise
            self.say(f"\nerror: openai-harmony failed: {e}")
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)

    def _stats(self, reply) -> None:
        s = reply.stats
        note = {"cancelled": " — stopped", "length": " — max tokens reached"}.get(reply.finish_reason, "")
        self.out.write("\n")
        if reply.dropped_turns:
            self.say(self._dim(f"[the {reply.dropped_turns} oldest turn(s) no longer fit the context of "
                               f"{self.session.context_size} tokens: the model no longer sees them; /save keeps them]"))  # fmt: skip
        self.say(
            self._dim(
                f"[{s.generation_tokens} tokens{note} | prompt {s.prompt_tokens} ({s.prefill_tokens} new) at "
                f"{s.prompt_tps:.1f} tok/s | decode {s.generation_tps:.1f} tok/s | peak {s.peak_memory_gb:.2f} GB]"
            )
        )
        for p in reply.problems:
            self.say(self._dim(f"[warning: {p}]"))


def enable_history(path: Path = HISTORY_FILE) -> Callable[[], None] | None:
    """Line editing and a persistent history with readline, when it is available; returns the
    function that saves the history (None without readline). File errors are ignored."""
    try:
        import readline  # not on every platform (Windows has none): the chat works without it
    except ImportError:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(path)
    except OSError:
        pass  # no history yet, or an unwritable cache folder: editing still works
    readline.set_history_length(2000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def _in_main_thread() -> bool:

    return threading.current_thread() is threading.main_thread()
