"""A progress line for long work: step, step/s, tokens/s, loss and ETA."""

import sys
import time


class Progress:
  """Prints ``step 120/500 | 3.1 step/s | 12,400 tok/s | loss 2.314 | ETA 2m03s``.

  On a terminal it redraws one line; otherwise (CI, logs) it prints a line every ``every`` steps.
  Only process 0 prints.
  """

  def __init__(self, total: int, start: int = 0, *, every: int = 10, active: bool = True, stream=sys.stderr):
    self.total, self.step, self.every, self.active, self.stream = total, start, every, active, stream
    self._t0, self._s0 = time.perf_counter(), start
    self._tty = hasattr(stream, "isatty") and stream.isatty()

  def update(self, step: int, *, loss: float, tokens_per_step: int) -> None:
    self.step = step
    if not self.active or (not self._tty and step % self.every and step != self.total):
      return
    elapsed = max(time.perf_counter() - self._t0, 1e-9)
    rate = (step - self._s0) / elapsed
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    line = (f"step {step}/{self.total} | {rate:.2f} step/s | {rate * tokens_per_step:,.0f} tok/s | "
            f"loss {loss:.4f} | ETA {_duration(eta)}")
    if self._tty:
      self.stream.write("\r" + line.ljust(100))
      if step == self.total:
        self.stream.write("\n")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()


def _duration(seconds: float) -> str:
  if seconds == float("inf"):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
