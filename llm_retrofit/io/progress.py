"""What a long run prints for a person: progress with an estimate of time left, and no library noise.

`Progress` is a tqdm bar on a terminal. When stderr is not a terminal (a log file, a pipe, CI), it writes plain lines
instead: one when it starts, one at most every `RETROFIT_PROGRESS_INTERVAL` seconds (default 30) with done/total,
rate and ETA, and one when it ends, so a 30-minute search in a log file says how far it is. `RETROFIT_PROGRESS`
chooses: `auto` (the default: a bar on a terminal, lines otherwise), `bar`, `lines` or `off`.

`note` writes one such line (the recipe runner's step lines). `quiet_libraries` silences, for the duration of one of
our own calls, what the libraries print about it (transformers' weight-loading and shard-writing bars and its
warnings, deprecation warnings, the tokenizers fork warning), and restores the caller's settings afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

INTERVAL_ENV = "RETROFIT_PROGRESS_INTERVAL"
MODE_ENV = "RETROFIT_PROGRESS"
DEFAULT_INTERVAL = 30.0


def _mode(stream: TextIO) -> str:
    mode = os.environ.get(MODE_ENV, "auto").strip().lower()
    if mode not in ("bar", "lines", "off"):
        isatty = getattr(stream, "isatty", None)
        mode = "bar" if isatty is not None and isatty() else "lines"
    return mode


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """3.2s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _amount(value: float, scale: bool) -> str:
    if scale and value >= 1000:
        for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if value >= factor:
                return f"{value / factor:.1f}{suffix}"
    return f"{value:g}" if isinstance(value, float) and not value.is_integer() else f"{int(value)}"


def note(message: str) -> None:
    """One line for a person on stderr (nothing with RETROFIT_PROGRESS=off)."""
    stream = sys.stderr
    if _mode(stream) == "off":
        return
    print(f"retrofit: {message}", file=stream, flush=True)


class Progress:
    """A counter of `total` units of work named `desc`: a tqdm bar on a terminal, plain lines in a log file.

    Use as a context manager or call `close()`. `enabled=False` (a non-main process, progress turned off) prints
    nothing. `postfix` values (a loss, the best perplexity so far) go on the bar and on each line."""

    def __init__(self, total: float | None, desc: str, unit: str = "it", *, enabled: bool = True,
                 unit_scale: bool = False) -> None:
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n: float = 0
        self.postfix: dict[str, Any] = {}
        self.started = time.perf_counter()
        self._stream = sys.stderr
        self._mode = _mode(self._stream) if enabled else "off"
        self._interval = _interval()
        self._last = self.started
        self._closed = False
        self._bar: Any = None
        if self._mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=self._stream)
        elif self._mode == "lines":
            total_text = f", {self._quantity(total)} to do" if total else ""
            self._write(f"{desc}: started{total_text}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        if not n:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._mode == "lines":
            now = time.perf_counter()
            if now - self._last >= self._interval and (self.total is None or self.n < self.total):
                self._last = now
                self._write(self._status(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._mode == "lines":
            elapsed = time.perf_counter() - self.started
            rate = f", {self._rate(elapsed)}" if self.n else ""
            self._write(f"{self.desc}: done: {self._quantity(self.n)} in "
                        f"{duration(elapsed)}{rate}{self._postfix()}")

    def _rate(self, elapsed: float) -> str:
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if rate and rate < 1:
            return f"{1 / rate:.1f}s/{self.unit}"
        return f"{_amount(round(rate, 1), self.unit_scale)}{self._separator}{self.unit}/s"

    @property
    def _separator(self) -> str:
        return "" if self.unit == "B" else " "  # 538.1MB, 3.1k tok

    def _quantity(self, value: float) -> str:
        """`538.1MB`, `3.1k tok`, `6 candidates`, `1 step`: a word unit takes a plural, an abbreviation does not."""
        unit = self.unit + ("s" if len(self.unit) > 3 and self.unit.isalpha() and value != 1 else "")
        return f"{_amount(value, self.unit_scale)}{self._separator}{unit}"

    def _status(self, now: float) -> str:
        elapsed = now - self.started
        done = _amount(self.n, self.unit_scale)
        if self.total:
            share = f"{done}/{self._quantity(self.total)} ({100 * self.n / self.total:.0f}%)"
            left = (self.total - self.n) * elapsed / self.n if self.n else None
            eta = f", ETA {duration(left)}" if left is not None else ""
        else:
            share, eta = self._quantity(self.n), ""
        return f"{self.desc}: {share}, {self._rate(elapsed)}, elapsed {duration(elapsed)}{eta}{self._postfix()}"

    def _postfix(self) -> str:
        return "".join(f", {key} {value}" for key, value in self.postfix.items())

    def _write(self, line: str) -> None:
        print(f"retrofit: {line}", file=self._stream, flush=True)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """For one of our own calls: no transformers / huggingface_hub progress bars or warnings, no deprecation
    warnings, no tokenizers fork warning. The caller's settings are restored afterwards (an API user who wants the
    bars elsewhere keeps them). Also a decorator, as every `contextmanager`: `@quiet_libraries()`."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    restore: list[Any] = []
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    restore.append(lambda: hf_logging.set_verbosity(verbosity))
    restore.append(lambda: hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar())
    hub_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    restore.append(lambda: None if hub_disabled else enable_progress_bars())
    for name in ("huggingface_hub", "accelerate"):  # accelerate: the notice that offloaded weights sit on meta
        quieted = logging.getLogger(name)
        restore.append(lambda quieted=quieted, level=quieted.level: quieted.setLevel(level))
        quieted.setLevel(max(quieted.level, logging.ERROR))
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    if parallelism is None:  # the warning a fork after a tokenizer ran prints; the user's choice if they made one
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        restore.append(lambda: os.environ.pop("TOKENIZERS_PARALLELISM", None))
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        for undo in reversed(restore):
            undo()
