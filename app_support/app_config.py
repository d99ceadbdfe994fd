"""The app's settings: LCKV_<NAME> environment variables, then the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping

from lckv_stream.limits import check
from lckv_stream.store import store_enabled


@dataclass(frozen=True)
class AppConfig:
    """Settings read from the environment (LCKV_<NAME>) and the command line."""

    model: str = "default"
    device: str = "auto"
    idle_minutes: float = 30.0
    max_generations: int = 0  # 0: the device's default batch (64 on a GPU, 8 on CPU)
    queue_size: int = 32
    sink: int = 4
    window: int = 1024
    max_new_tokens: int = 256
    store: str = "on"  # off: conversations are not saved
    data_dir: str = ""  # where the store is; empty: lckv_stream.store.default_data_dir

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides) -> AppConfig:
        """Config from LCKV_* variables; a bad value raises ValueError naming the variable."""
        values = {}
        for spec in fields(cls):
            raw = environ.get(f"LCKV_{spec.name.upper()}")
            if raw is None:
                continue
            kind = {"str": str, "int": int, "float": float}[spec.type]
            try:
                values[spec.name] = kind(raw)
            except ValueError:
                raise ValueError(f"LCKV_{spec.name.upper()} must be {spec.type}, got {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """The starting values must be ones the page's controls can show (the ranges of limits.py)."""
        for name in ("sink", "window", "max_new_tokens"):
            try:
                check(name, getattr(self, name))
            except ValueError as error:
                raise ValueError(f"LCKV_{name.upper()}: {error}") from None
        store_enabled({"LCKV_STORE": self.store})  # on or off, else ValueError
        if self.idle_minutes <= 0 or self.queue_size < 1:
            raise ValueError("LCKV_IDLE_MINUTES and LCKV_QUEUE_SIZE must be positive")
        if not 0 <= self.max_generations <= 64:
            raise ValueError(f"LCKV_MAX_GENERATIONS must be between 1 and 64 (0: the device's default), got {self.max_generations}")

    def store_environ(self, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
        """`environ` with this config's LCKV_STORE and LCKV_DATA_DIR, as `open_store` reads them."""
        values = dict(environ, LCKV_STORE=self.store)
        if self.data_dir:
            values["LCKV_DATA_DIR"] = self.data_dir
        return values
