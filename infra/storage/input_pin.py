"""What the plan read, so that the generation pass reads the same bytes or stops.

The plan hashes the input (its sha256 is in the config hash), and the generation pass reads it a
second time, lazily, for the whole run. Between the two a producer may rewrite or append to it.
The plan pins what it opened: a local file's size, mtime and inode (`os.fstat` of the open file,
so a file replaced by a rename after it was opened is still read whole); an S3 object's
VersionId when the bucket keeps versions, else its ETag. The second pass opens the input against
the pin (S3: `VersionId`, or `IfMatch` on every GET, ranged ones included; local: the same fstat
after every read), so no record read after a change reaches a part.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from infra.errors import InputChanged


@dataclass(frozen=True)
class InputPin:
    uri: str
    size: int | None
    mtime_ns: int | None = None
    inode: int | None = None
    device: int | None = None
    etag: str | None = None
    version_id: str | None = None
    sha256: str | None = None  # set once the plan has read it all
    # Not in `changes` (a chmod moves it, the bytes stay): only `same_object` reads it.
    ctime_ns: int | None = None

    @classmethod
    def of_file(cls, uri: str, st: os.stat_result) -> "InputPin":
        return cls(uri, st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino, device=st.st_dev, ctime_ns=st.st_ctime_ns)

    def same_object(self, now: "InputPin") -> bool:
        """Is `now`, a later look that read nothing, the very object this pin describes? On S3 the
        same VersionId (a version never changes), else the same ETag and size; locally the same
        device, inode, size, mtime and ctime: ctime because no user can set it back (any write, and
        a `touch` that restores the mtime, moves it). A field not known never matches."""
        if self.uri != now.uri:
            return False
        if self.version_id:
            return now.version_id == self.version_id
        if self.etag:
            return now.etag == self.etag and now.size == self.size
        seen = (self.device, self.inode, self.size, self.mtime_ns, self.ctime_ns)
        return None not in seen and seen == (now.device, now.inode, now.size, now.mtime_ns, now.ctime_ns)

    def changes(self, now: "InputPin") -> list[str]:
        """What differs between this pin and what is seen `now`, in words."""
        seen = []
        if (self.device, self.inode) != (now.device, now.inode):
            seen.append(f"replaced by another file (inode {self.inode} -> {now.inode})")
        if self.size != now.size:
            seen.append(f"size {self.size} -> {now.size} bytes")
        if self.mtime_ns != now.mtime_ns:
            seen.append("modified since (mtime changed)")
        return seen

    def check(self, now: "InputPin") -> None:
        if changes := self.changes(now):
            raise input_changed(self, "; ".join(changes))


def input_changed(pin: InputPin, what: str) -> InputChanged:
    digest = f" (sha256 {pin.sha256[:16]}…)" if pin.sha256 else ""
    return InputChanged(
        f"Input {pin.uri} changed while the run was reading it: {what}. The run stopped before any record read after "
        f"the change was published; the parts already published come from the input the plan read{digest}. Restore that "
        "input and rerun with the same run_id to finish, or start a new run on the new input (`nemotron-sdg run "
        "--new-run`, or another run_id)."
    )
