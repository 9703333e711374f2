"""A run's output in a local directory (`LocalOutputStore`); a local input file is `infra.storage.local_input`.

Every write is atomic: a temp file in the run directory, synced, then renamed (or linked) into
place; every access goes through the run directory's descriptor, opened once (see
`LocalOutputStore`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from infra.errors import ConfigError, LocationChanged, StorageError
from infra.system.locks import flock_within
from infra.storage.uris import validate_key_component
from infra.run.layout import MANIFEST, RUN_CONFIG, TEMP_SUFFIX, temp_prefix

# A local output that fails with these is the user's to fix (a path, permissions, a read-only or full
# disk): one line and exit 2. Anything else (EIO ...) may pass and stays a StorageError.
USER_FIXABLE = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EROFS, errno.ENOSPC,
                errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


def preflight_error(root: Path, exc: OSError) -> Exception:
    seen = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    error = ConfigError if exc.errno in USER_FIXABLE else StorageError
    return error(f"Output directory {root} is not writable ({seen}). Pick another output_uri or fix its permissions.")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _PinnedDir:
    """A descriptor of the run directory, closed with the store that opened it."""

    # Bound here: a store still alive at interpreter exit is collected after the `os` module's globals
    # are cleared, and `os.close` there raised AttributeError on stderr ("Exception ignored in ...").
    _close = staticmethod(os.close)

    def __init__(self, fd: int):
        self.fd = fd
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)

    def __del__(self) -> None:
        try:
            self._close(self.fd)
        except OSError:
            pass



class LocalOutputStore:
    """A run directory. Its path is resolved when the store is made (right after
    NSDG_ALLOWED_URIS was checked on the same resolution) and the directory is opened once, not
    through a symlink; every write and read then goes through that descriptor (dir_fd-relative
    open, rename, link, unlink), and each first checks that the path still leads to that very
    directory. A run directory swapped for a symlink (or moved) mid-run is refused with
    LocationChanged, never followed: the allowed-locations check holds for every write."""

    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)
        try:
            self._resolved = root.resolve()  # what check_run_locations saw
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an embedded NUL
            raise ConfigError(f"Output location {str(root)!r} cannot be resolved ({exc}). Give a plain local path "
                              "as output_uri.") from None
        self._pinned: _PinnedDir | None = None
        self._retired: list[_PinnedDir] = []
        self._pin_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # A descriptor means nothing in another process: a copy opens (and checks) its own.
        return {k: v for k, v in self.__dict__.items() if k not in ("_pinned", "_retired", "_pin_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _pinned=None, _retired=[], _pin_lock=threading.Lock())

    def uri(self, name: str) -> str:
        return str(self.root / name)

    def _dir(self, create: bool = True) -> int | None:
        """The run directory's descriptor, checked; None when it does not exist and `create` is off."""
        with self._pin_lock:
            if self._pinned is None:
                if create:
                    self._resolved.mkdir(parents=True, exist_ok=True)
                try:
                    self._pinned = _PinnedDir(os.open(self._resolved, _DIR_FLAGS))
                except OSError as exc:
                    if os.path.islink(self._resolved):  # a symlink where the directory was resolved
                        raise self._changed() from None
                    if not create and isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                        return None
                    raise
        self._check()
        return self._pinned.fd

    def _check(self) -> None:
        """The path still resolves where it did, to the directory we hold open."""
        try:
            same = self.root.resolve() == self._resolved and _identity(self.root) == self._pinned.ident
        except (OSError, RuntimeError):  # a symlink loop
            same = False
        if not same:
            raise self._changed()

    def _changed(self) -> LocationChanged:
        try:
            now = f"now resolves to {self.root.resolve()}" + (" (a symlink)" if self.root.is_symlink() else "")
        except (OSError, RuntimeError) as exc:
            now = f"now cannot be resolved ({exc})"
        if not os.path.lexists(self.root):
            now = "is gone"
        return LocationChanged(
            f"Output directory {self.root} is no longer the directory this run checked and opened at its start "
            f"({self._resolved}): it {now}. Nothing is written through it, so no write leaves the allowed locations "
            f"(NSDG_ALLOWED_URIS). Put the run directory back at {self.root} (remove the link, move it back) and rerun "
            "with the same run_id; find out who replaced it.")

    def preflight(self) -> None:
        """Prove the run directory can be made and written; a refusal leaves no folder behind."""
        held = [name for name in (MANIFEST, RUN_CONFIG) if (self._resolved.parent / name).is_file()]
        if held:  # output_uri is itself a run's folder: this run would nest inside that dataset
            raise ConfigError(f"Output location {self.root.parent} already holds another run ({held[0]} is there): "
                              f"runs go to {{output_uri}}/{{run_id}}/, so give its parent ({self.root.parent.parent}) "
                              "or a new folder as output_uri.")
        missing = [f for f in [*reversed(self._resolved.parents), self._resolved] if not os.path.lexists(f)]
        try:
            d = self._dir()
            tmp, fd = _new_temp(d, ".preflight-", "")
            os.close(fd)
            os.unlink(tmp, dir_fd=d)
        except OSError as exc:
            for folder in reversed(missing):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise preflight_error(self.root, exc) from None

    def publish_file(self, name: str, path: Path, sha256: str) -> None:
        target = validate_key_component(name, "object name")
        d = self._dir()
        path = Path(path)
        if _identity(path.parent) == self._pinned.ident:
            os.replace(path.name, target, src_dir_fd=d, dst_dir_fd=d)  # same directory: the rename is the atomic step
        else:
            with open(path, "rb") as f:
                self._publish(target, self._temp_copy(target, f))

    def _temp_copy(self, name: str, data: bytes | BinaryIO) -> str:
        """`data` (bytes, or a file streamed in 1 MiB reads, never whole) in a synced temp file next
        to `name` (its name in the run directory), ready to be renamed or linked into place."""
        d = self._dir()
        tmp, fd = _new_temp(d, temp_prefix(name), TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink(tmp, d)
            raise
        return tmp

    def write_bytes(self, name: str, data: bytes) -> None:
        target = validate_key_component(name, "object name")  # before a temp file is named after it
        self._publish(target, self._temp_copy(target, data))

    def _publish(self, target: str, tmp: str) -> None:
        """The temp file `tmp` renamed into place as `target` (a checked name)."""
        d = self._pinned.fd
        try:
            self._check()  # again: the temp file took a while, and the rename is what publishes
            os.replace(tmp, target, src_dir_fd=d, dst_dir_fd=d)
        except BaseException:
            _unlink(tmp, d)
            raise

    def move_in(self, source: "LocalOutputStore", name: str) -> bool:
        """`source`'s object `name` moved here, never read whole: renamed (one file system), else
        streamed into a temp file renamed into place, then removed there. False when the source
        has none. `source`: another run directory (a FencedStore around one too)."""
        target, src = validate_key_component(name, "object name"), source.dir_fd()
        if src is None:
            return False
        try:
            os.rename(target, target, src_dir_fd=src, dst_dir_fd=self._dir())
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        with source.open_read(name) or contextlib.nullcontext() as f:
            if f is None:
                return False
            self._publish(target, self._temp_copy(target, f))
        source.delete(name)
        return True

    def dir_fd(self) -> int | None:
        """The held run directory's descriptor, checked; None when it does not exist."""
        return self._dir(create=False)

    def open_read(self, name: str) -> BinaryIO | None:
        """`name` in the held run directory, opened to read (never through a symlink); None when absent."""
        name = validate_key_component(name, "object name")
        d = self._dir(create=False)
        if d is None:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StorageError(f"{self.root / name} is a symlink: a run's files are never links, and it is not "
                               "followed. Remove it and rerun.") from None
        return os.fdopen(fd, "rb")

    def read_bytes(self, name: str) -> bytes | None:
        f = self.open_read(name)
        if f is None:
            return None
        with f:
            return f.read()

    def list_names(self) -> list[str]:
        d = self._dir(create=False)
        if d is None:
            return []
        names = []
        for name in os.listdir(d):
            try:
                regular = stat.S_ISREG(os.stat(name, dir_fd=d, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                continue
            if regular and not name.startswith("."):
                names.append(name)
        return sorted(names)

    def sha256(self, name: str) -> str | None:
        """The object's sha256 as it is now (hashed), or None when it does not exist. Through the
        held directory, never a symlink, like every other access."""
        f = self.open_read(name)
        if f is None:
            return None
        h = hashlib.sha256()
        with f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def delete(self, name: str) -> None:
        """Remove `name`; a missing one is already removed."""
        name = validate_key_component(name, "object name")
        d = self._dir(create=False)
        if d is None:
            return
        try:
            os.unlink(name, dir_fd=d)
        except FileNotFoundError:
            pass

    def abort_incomplete_uploads(self) -> list[str]:
        return []  # a local part is renamed into place: there is no upload to leave open

    def staging_dir(self) -> Path:
        """Parts are written here and renamed into place, so a half-written part never shows. On
        Linux it is the held descriptor's /proc path: a temp file lands in the checked directory
        even if the run directory is swapped while it is being written."""
        d = self._dir()
        proc = Path(f"/proc/self/fd/{d}")
        return proc if proc.is_dir() else self.root

    # -- conditional writes, for infra/run/lease.py. A version is the content's sha256; replace and
    # delete hold an flock on a sidecar file, so a compare and its write are one step.

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        """Create `name` with `data` unless it exists (O_EXCL semantics, through link(2), so the
        object appears whole); returns its version, or None when it already exists."""
        target = validate_key_component(name, "object name")
        tmp = self._temp_copy(name, data)
        d = self._pinned.fd
        try:
            self._check()
            os.link(tmp, target, src_dir_fd=d, dst_dir_fd=d)
        except FileExistsError:
            return None
        finally:
            _unlink(tmp, d)
        return hashlib.sha256(data).hexdigest()

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        data = self.read_bytes(name)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """An flock on a sidecar file, removed again while still held, so no lock file outlives its
        step in the run folder (issue 27). A waiter that locked a file someone removed meanwhile
        sees it is no longer the one at the path and opens it again."""
        lock_name = f".{validate_key_component(name, 'object name')}.lock"
        d = self._dir()
        while True:
            fd = os.open(lock_name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                         dir_fd=d)
            lock = os.fdopen(fd, "ab")
            try:
                flock_within(lock, f"{self.root}/{name}")
            except BaseException:
                lock.close()
                raise
            try:
                st, now = os.fstat(fd), os.stat(lock_name, dir_fd=d, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    break
            except FileNotFoundError:
                pass
            lock.close()
        with lock:
            try:
                yield
            finally:
                _unlink(lock_name, d)

    def replace_if_version(self, name: str, data: bytes, version: str) -> str | None:
        """Replace `name` only if it still holds `version`; returns the new version, or None."""
        with self._locked(name):
            current = self.read_versioned(name)
            if current is None or current[1] != version:
                return None
            self.write_bytes(name, data)
        return hashlib.sha256(data).hexdigest()

    def delete_if_version(self, name: str, version: str) -> bool:
        with self._locked(name):
            current = self.read_versioned(name)
            if current is None or current[1] != version:
                return False
            os.unlink(name, dir_fd=self._dir())
        self._remove_if_empty()  # a run refused after its lease was taken leaves no empty folder
        return True

    def _remove_if_empty(self) -> None:
        """Remove the run directory when nothing is left in it (rmdir refuses otherwise)."""
        with self._pin_lock:
            with contextlib.suppress(OSError):
                if self._pinned is not None and not os.listdir(self._pinned.fd):
                    os.rmdir(self._resolved)
                    # A later write makes and opens it afresh. The old descriptor stays open (never
                    # reused under a thread still holding its number): one per removal.
                    self._retired.append(self._pinned)
                    self._pinned = None


def _new_temp(dir_fd: int, prefix: str, suffix: str) -> tuple[str, int]:
    """mkstemp inside the directory `dir_fd`: (its name, an fd open for writing). Mode 0666 less the
    umask, not mkstemp's 0600: the file is renamed into place, and a team's shared output folder must
    be readable by the team (issue 27)."""
    for _ in range(100):
        name = f"{prefix}{uuid.uuid4().hex[:8]}{suffix}"
        try:
            return name, os.open(name, _NEW_FILE, 0o666, dir_fd=dir_fd)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name {prefix}*{suffix}")


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
