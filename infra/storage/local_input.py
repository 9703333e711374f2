"""A local input file: checked before any allocation (`check_local_input`), read as a raw stream
checked against its pin (`LocalInput`)."""

from __future__ import annotations

import io
import os

from infra.errors import ConfigError, InputChanged
from infra.storage.input_pin import InputPin
from infra.storage.uris import local_path


def check_local_input(input_uri: str) -> None:
    """Fail before any allocation when the local input cannot be read."""
    path = local_path(input_uri)
    if path.is_dir():  # was "not found": the trial pointed a second run at a first run's folder
        raise ConfigError(f"Input {input_uri!r} is a directory ({path.resolve()}); input_uri takes one JSONL or .txt "
                          "file: for a run's output, give one of its kept-*/part-*.jsonl files or concatenate them.")
    if not path.is_file():
        raise ConfigError(f"Input {input_uri!r} not found ({path.resolve()} is not a file). Check input_uri.")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"Input {path} is not readable. Fix its permissions.")


class LocalInput(io.RawIOBase):
    """A local input file as a raw stream, checked against its pin after every read: a rewrite
    in place or an append is seen before any byte read after it is used."""

    def __init__(self, uri: str, pin: InputPin | None):
        super().__init__()
        self._file = open(local_path(uri), "rb", buffering=0)
        self._uri = uri
        self.pin = InputPin.of_file(uri, os.fstat(self._file.fileno()))
        self._expected = pin or self.pin
        try:
            self.verify()
        except InputChanged:
            self._file.close()
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self.verify()
        return n

    def verify(self) -> None:
        self._expected.check(InputPin.of_file(self._uri, os.fstat(self._file.fileno())))

    def close(self) -> None:
        self._file.close()
        super().close()
