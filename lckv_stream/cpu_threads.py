"""Keep the CPU's parallel work on one long-lived thread: the engine's.

Torch's CPU kernels, the compiled steps and this project's kernels all run their parallel regions
through OpenMP (libgomp), which keeps a team of worker threads per thread that ever ran one. When
the teams' threads outnumber the CPUs, libgomp's idle workers stop spinning after a few hundred
iterations and sleep, and every parallel region then waits for the kernel to wake one: on two CPUs
a 3072 x 576 int8 product took 50 us on the engine's thread alone, and 270-400 us once the main
thread had run one parallel op before (loading the model). A team goes away with its thread, so
work done before the engine starts (loading, quantizing, compiling) runs on a passing thread.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

Result = TypeVar("Result")


def in_passing_thread(function: Callable[..., Result], *args, **kwargs) -> Result:
    """`function(*args, **kwargs)` run on a new thread that ends when it returns (its OpenMP team
    ends with it); its result, or its exception raised here."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as error:  # raised again on the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="lckv-passing", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]
