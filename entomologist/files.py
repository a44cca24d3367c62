"""Bounded reads, durable writes, and folders nobody else can change.

Reads: every file the product reads is a regular file under a size cap,
opened without blocking (a FIFO or a device node would hang the boot).

Writes: a temporary file beside the target, born with its final mode,
fsynced, renamed into place, and the folder fsynced: a power cut leaves the
old file or the new one, never half of one.

Trust (as OpenSSH's StrictModes): a path is used only if it and every folder
above it belong to root or to us and nobody else can write them; a sticky
folder such as /tmp is fine above it, since others cannot rename our entries.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path

from .errors import ConfigError, ReadOnlyStorage, StorageError

log = logging.getLogger("entomologist")

# Certificates, keys, the config: none is near this; a bigger file is not ours.
MAX_FILE_BYTES = 1 << 20
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.tmp")


class FileProblem(ConfigError):
    """A file cannot be read as a small regular file; ``missing`` if it does not exist,
    ``unreadable`` if it is there but opening or reading it failed (EIO, EACCES...):
    what it holds is unknown, not wrong."""

    def __init__(self, message: str, hint: str | None = None, missing: bool = False,
                 unreadable: bool = False):
        super().__init__(message, hint)
        self.missing = missing
        self.unreadable = unreadable


def read_bounded(path: Path, what: str, limit: int = MAX_FILE_BYTES,
                 hint: str | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, else FileProblem."""
    where = f"{what} {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileProblem(f"{where} does not exist", hint=hint, missing=True) from None
    except OSError as exc:
        raise FileProblem(f"{where} cannot be opened: {exc.strerror}", hint=hint,
                          unreadable=True) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(f"{where} is not a regular file", hint=hint)
        if st.st_size > limit:
            raise FileProblem(f"{where} is too large ({st.st_size} bytes, at most {limit})",
                              hint=hint)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise FileProblem(f"{where} cannot be read: {exc.strerror}", hint=hint,
                          unreadable=True) from None
    finally:
        os.close(fd)
    if total > limit:
        raise FileProblem(f"{where} is too large (more than {limit} bytes)", hint=hint)
    return b"".join(chunks)


UNREADABLE_HINT = "the storage (a failing card?) and the file's owner and mode"


def read_credential(path: Path, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """``read_bounded``, except that a file that is there but cannot be read (a
    failing card's EIO, a mode the run cannot open) ends the run (73, retried): judged
    absent or broken, it would be provisioned over, spending a registration on a pair
    that may be sound and leaving its certificate active with no device to hold it."""
    try:
        return read_bounded(path, what, limit)
    except FileProblem as exc:
        if exc.unreadable:
            raise StorageError(str(exc), hint=UNREADABLE_HINT) from None
        raise


# ------------------------------------------------------------------ trust

def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def _untrusted(path: Path, st: os.stat_result, allow_sticky: bool) -> str | None:
    if not _owner_ok(st):
        return f"is owned by uid {st.st_uid}, neither root nor this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if allow_sticky and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            return None
        return "can be written by group or others"
    return None


MAX_SYMLINKS = 40  # as the kernel's path walk


def trusted_path(path: Path, what: str, hint: str | None = None) -> Path:
    """The real path of an existing ``path`` after checking that nobody else can change it.

    The path is walked one component at a time, as the kernel walks it: every
    folder passed through and the final entry must be trusted, and every
    symlink followed must belong to root or to us.  So a link into a folder we
    trust is legitimate (read-only root images link /etc files), while a link
    another user planted, even in a sticky folder, is refused: realpath()
    would follow it blindly.  The real path is returned and used from then on.
    """
    pending = list(Path(os.path.join(os.getcwd(), path)).parts[1:])
    current, links = Path("/"), 0
    _check(path, current, os.lstat(current), what, hint, final=False)
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            raise FileProblem(f"{what} {path} does not exist", hint=hint, missing=True) from None
        except OSError as exc:
            raise FileProblem(f"{what} {path}: cannot check {candidate}: {exc.strerror}",
                              hint=hint) from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise FileProblem(f"{what} {path} cannot be opened: a symlink loop", hint=hint)
            if not _owner_ok(st):
                raise ConfigError(f"refusing {what} {path}: the symlink {candidate} belongs to "
                                  f"uid {st.st_uid}, neither root nor this user",
                                  hint=hint or f"remove {candidate}")
            target = os.readlink(candidate)
            if os.path.isabs(target):
                current = Path("/")
            pending = [part for part in Path(target).parts if part != "/"] + pending
            continue
        _check(path, candidate, st, what, hint, final=not pending)
        current = candidate
    return current


def _check(path: Path, part: Path, st: os.stat_result, what: str, hint: str | None,
           final: bool) -> None:
    problem = _untrusted(part, st, allow_sticky=not final)
    if problem:
        shown = part if part == path else f"{part} (for {path})"
        raise ConfigError(f"refusing {what} {shown}: it {problem}",
                          hint=hint or f"chown root {part} and chmod go-w {part}")


def trusted_dir(directory: Path, what: str, create: bool = False) -> Path:
    """Like ``trusted_path`` for a folder; with ``create``, a missing one is made 0700
    in a trusted parent.  An existing folder's mode is never changed: it may be
    one we did not make (a CERT_DIR set to /etc by mistake), and the key in it
    is 0600 whatever the folder's mode."""
    try:
        real = trusted_path(directory, what)
    except FileProblem as exc:
        if not (create and exc.missing):
            raise
        parent = trusted_path(Path(os.path.join(os.getcwd(), directory)).parent,
                              f"the folder of {what}")
        real = parent / Path(directory).name
        try:
            os.mkdir(real, 0o700)
            fsync_dir(parent)
        except FileExistsError:
            pass
        except OSError as exc:
            raise write_failure(f"cannot create {what} {real}", real, exc,
                                hint=f"that {parent} is writable") from None
        real = trusted_path(real, what)
    if not os.path.isdir(real):
        raise ConfigError(f"{what} {directory} is not a folder")
    return real


# ----------------------------------------------------------------- writes

def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")


def _write_temp(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> Path:
    """A fsynced temporary file beside ``path`` holding ``data``, with its final mode
    (fchmod before any byte is written: the umask would narrow a 0644 file) and owner."""
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None and (os.fstat(fd).st_uid, os.fstat(fd).st_gid) != owner:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


MOUNTINFO = Path("/proc/self/mountinfo")
SANDBOX_HINT = ("the unit's sandbox: ProtectSystem=strict leaves only the folders in "
                "ReadWritePaths= writable; add this one in a drop-in (README, "
                "\"A read-only root\")")


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_only_view(path: Path, mountinfo: Path = MOUNTINFO) -> bool:
    """True when the mount holding ``path`` is read-only while its file system is
    writable: a read-only bind mount, which is what ProtectSystem=strict makes of
    every path outside ReadWritePaths=.  A root mounted read-only says ro twice."""
    try:
        target = os.path.realpath(path)
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read(MAX_FILE_BYTES).splitlines()
    except OSError:
        return False
    found = None
    for line in lines:
        fields = line.split(" ")
        try:
            point = _unescape_mountinfo(fields[4])
            mount_options = fields[5].split(",")
            super_options = fields[fields.index("-", 6) + 3].split(",")
        except (IndexError, ValueError):
            continue
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # The last of stacked mounts on one point is the one in use.
        if inside and (found is None or len(point) >= len(found[0])):
            found = (point, mount_options, super_options)
    return found is not None and "ro" in found[1] and "rw" in found[2]


def write_failure(message: str, path: Path, exc: OSError, hint: str) -> StorageError:
    """The error for a failed write, a removal or a rename at ``path``: on a read-only
    file system, say whether the mount or the unit's sandbox made it so."""
    if exc.errno == errno.EPERM:
        why = "not permitted (the owner or group cannot be kept without privileges)"
    else:
        why = exc.strerror or str(exc)
    if exc.errno != errno.EROFS:
        return StorageError(f"{message}: {why}", hint=hint)
    if read_only_view(path.parent):
        if os.environ.get("INVOCATION_ID"):
            return ReadOnlyStorage(f"{message}: {why}; the file system is writable, but not "
                                   f"from inside this systemd unit", hint=SANDBOX_HINT)
        return ReadOnlyStorage(f"{message}: {why} (a read-only bind mount of a writable "
                               f"file system)", hint=f"the mounts of {path.parent}")
    return ReadOnlyStorage(f"{message}: {why}",
                           hint=f"whether {path.parent} is meant to be on a read-only file "
                                f"system")


def _storage_error(path: Path, exc: OSError) -> StorageError:
    return write_failure(f"cannot write {path}", path, exc,
                         hint=f"that {path.parent} is writable and the disk is not full")


def write_file_atomic(path: Path, data: bytes, mode: int,
                      owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data``: it is either the old or the new file, whole."""
    try:
        tmp = _write_temp(path, data, mode, owner)
    except OSError as exc:
        raise _storage_error(path, exc) from None
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _storage_error(path, exc) from None


def too_few_inodes(vfs: os.statvfs_result, count: int) -> bool:
    """Whether a file system has fewer than ``count`` free inodes for this user (one
    that counts none, f_files 0 as on btrfs, never runs out)."""
    return bool(vfs.f_files) and vfs.f_favail < count


def require_inodes(directory: Path, count: int) -> None:
    """StorageError unless the file system under ``directory`` has ``count`` free inodes."""
    try:
        vfs = os.statvfs(directory)
    except OSError as exc:
        raise _storage_error(directory, exc) from None
    if too_few_inodes(vfs, count):
        raise StorageError(f"cannot write in {directory}: {vfs.f_favail} free inodes, fewer "
                           f"than the {count} new files need",
                           hint=f"that the disk of {directory} is not full (df -i)")


def rehearse_write(path: Path, data: bytes, mode: int,
                   owner: tuple[int, int] | None = None) -> None:
    """Everything ``write_file_atomic`` would do but the rename: proves, before
    anything is spent, that the folder takes the file with its mode and owner."""
    try:
        tmp = _write_temp(path, data, mode, owner)
    except OSError as exc:
        raise _storage_error(path, exc) from None
    _unlink_quietly(tmp)


def rename_durably(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
        fsync_dir(target.parent)
    except OSError as exc:
        raise write_failure(f"cannot install {target}", target, exc,
                            hint=f"that {target.parent} is writable") from None


def remove_durably(path: Path) -> None:
    """Remove ``path`` if it exists.  Asked first: on a read-only mount, unlink()
    of a file that is not there fails with EROFS, not ENOENT, and a provisioned
    camera on a read-only root must not fail over files it never had."""
    try:
        os.lstat(path)
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise write_failure(f"cannot remove {path}", path, exc,
                            hint=f"that {path.parent} is writable") from None
    fsync_dir(path.parent)


def remove_stray_temp_files(directory: Path) -> None:
    """Delete temporary files a killed run left in a trusted ``directory``: only
    regular files named as ``write_file_atomic`` names them."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not _TEMP_NAME.fullmatch(name):
            continue
        path = directory / name
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
                log.debug("removed leftover %s", path)
        except OSError:
            pass
