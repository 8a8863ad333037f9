"""Reading and writing a volume's .tar.gz backups with our own member policy.

Restore runs as root and the archive is untrusted (anyone who could write the backup
location wrote it). Python's `extractall` is no defence here: Debian 12's 3.11.2 has no
`filter` argument at all, and the PEP 706 filters were bypassed through symlink chains and
`realpath` truncation until 3.11.13 (CVE-2025-4517 and friends). So this module never calls
`extractall`/`extract`, and its policy does not depend on the Python version:

- every name is checked in a first pass, before anything is written; an absolute name, a
  '..' component, a NUL, a name through a symlink member, a relative symlink whose target
  leaves the volume (resolved as the kernel would, through the archive's other symlinks) or a
  hardlink to anything but a regular file earlier in the archive refuses the whole archive,
  so a hostile archive leaves the volume untouched;
- absolute symlinks, device nodes, fifos and unknown member types are skipped and reported
  (containers make absolute links that mean something only inside them; a backup of a
  volume never needs devices; `tar` archives of /dev do);
- setuid/setgid/sticky bits are dropped (mode & 0o777), and owners are not taken from the
  archive unless asked: new entries get the owner of the volume's root, like files a
  container user writes there;
- everything is written through `plugin.confined.Tree`: no path beneath the volume is
  resolved by the kernel's ordinary lookup, a symlink already in the volume where a directory
  is needed is replaced by a directory, and a file or link is written under a temporary name
  and renamed over the final one, so an existing link (or hardlink) there is replaced and
  never written through.

Backups are written the same way: the volume is walked by descriptor, links are stored as
links, and special files are skipped. Members are named './...' like
`tar czf X -C /data .`, so either tool restores the other's archives.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from plugin.confined import Tree

#: Longest name the policy accepts, leaving room for the temporary name of the last part.
_PATH_MAX = 4096 - 80
_NAME_MAX = 255
#: Symlinks followed while checking one target, as the kernel's limit (ELOOP).
_MAX_HOPS = 40
#: A damaged archive: gzip raises EOFError when truncated, zlib.error when corrupt.
_READ_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError)


class ArchiveError(Exception):
    """The archive cannot be written or restored; the message says why and what to do."""


@dataclass
class ArchiveResult:
    """What a backup or restore did: counts by kind and the members it skipped, with why."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self, verb: str) -> str:
        text = (
            f"{verb} {self.files} files, {self.dirs} directories, {self.symlinks} symlinks, "
            f"{self.hardlinks} hardlinks"
        )
        return text + (f"; skipped {len(self.skipped)}" if self.skipped else "")


# -- writing ----------------------------------------------------------------------------------


def write_archive(src: str | Path, dest: str | Path, *, no_symlinks: bool = False) -> ArchiveResult:
    """Archive the directory *src* into the .tar.gz *dest*, atomically (a partial name in the
    same directory, then rename), so an interrupted backup never replaces a good one.
    *no_symlinks*: *src* is a resolved path that must hold no symlink (see Tree.at)."""
    final = Path(dest).absolute()
    partial = final.with_name(f".{final.name}.partial")
    result = ArchiveResult()
    try:
        # 0600 whatever the umask: the archive holds the volume's data, which may be private
        # (a 0700 volume); the admin widens it if they mean to share it.
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with (
            open(fd, "wb") as raw,
            Tree.at(src, no_symlinks=no_symlinks) as tree,
            tarfile.open(fileobj=raw, mode="w:gz") as tar,
        ):
            _add_tree(tree, tar, result)
        os.replace(partial, final)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ArchiveError(f"cannot write archive {final} from {src}: {exc}") from exc
    return result


def _add_tree(tree: Tree, tar: tarfile.TarFile, result: ArchiveResult) -> None:
    tar.addfile(_info(".", os.fstat(tree.fd), tarfile.DIRTYPE))
    first_name: dict[tuple[int, int], str] = {}  # (dev, ino) of files with several links
    for rel, st in _depth_first(tree, result):
        name = f"./{rel}"
        if stat.S_ISDIR(st.st_mode):
            tar.addfile(_info(name, st, tarfile.DIRTYPE))
            result.dirs += 1
        elif stat.S_ISLNK(st.st_mode):
            info = _info(name, st, tarfile.SYMTYPE)
            info.linkname = tree.readlink(rel)
            tar.addfile(info)
            result.symlinks += 1
        elif stat.S_ISREG(st.st_mode):
            _add_file(tree, tar, rel, first_name, result)
        else:
            result.skipped.append(f"{name}: {_kind(st.st_mode)}; not archived")


def _depth_first(tree: Tree, result: ArchiveResult) -> Iterator[tuple[str, os.stat_result]]:
    """(rel, lstat) beneath the root, each directory's entries right after it and sorted, as
    `tar` writes them: GNU tar sets a directory's mtime when the next member is outside it, so
    an archive in `Tree.walk`'s order restores with wrong directory times. Listing goes through
    `Tree.scandir` (by descriptor, links never followed) like `Tree.walk`."""
    stack: list[tuple[str, Iterator[tuple[str, os.stat_result]]]] = []
    rel = ""
    while True:
        try:
            stack.append((rel, iter(sorted(tree.scandir(rel), key=lambda e: e[0]))))
        except OSError as exc:
            result.skipped.append(f"./{rel}: cannot be listed ({exc.strerror}); not archived")
        while stack:
            head, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            rel = f"{head}/{entry[0]}" if head else entry[0]
            yield rel, entry[1]
            if stat.S_ISDIR(entry[1].st_mode):
                break
        else:
            return


def _add_file(
    tree: Tree,
    tar: tarfile.TarFile,
    rel: str,
    first_name: dict[tuple[int, int], str],
    result: ArchiveResult,
) -> None:
    """One regular file, read through a descriptor. It is opened O_PATH first and reopened
    for reading only once fstat says it is still a regular file: opening a device node a
    container swapped in since the walk could block or act on the device."""
    name = f"./{rel}"
    path_fd = tree.open(rel, os.O_PATH)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            result.skipped.append(f"{name}: changed into a {_kind(st.st_mode)}; not archived")
            return
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in first_name:
                info = _info(name, st, tarfile.LNKTYPE)
                info.linkname = first_name[key]
                tar.addfile(info)
                result.hardlinks += 1
                return
            first_name[key] = name
        with open(f"/proc/self/fd/{path_fd}", "rb") as data:
            info = _info(name, os.fstat(data.fileno()), tarfile.REGTYPE)
            tar.addfile(info, data)
        result.files += 1
    finally:
        os.close(path_fd)


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = st.st_mtime
    info.size = st.st_size if kind == tarfile.REGTYPE else 0
    return info


def _kind(mode: int) -> str:
    for test, text in (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return text
    return "special file"


# -- reading: the policy ----------------------------------------------------------------------


def _refuse(member: str, why: str) -> ArchiveError:
    return ArchiveError(
        f"archive member {member!r} {why}: refusing the archive; nothing was extracted"
    )


def _normalise(raw: str) -> str:
    """'./a//b/' -> 'a/b'; '' is the volume root. Hostile names refuse the archive."""
    if "\0" in raw:
        raise _refuse(raw, "contains a NUL character")
    if raw.startswith("/"):
        raise _refuse(raw, "is an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(raw, "leaves the volume ('..')")
    rel = "/".join(parts)
    if any(len(os.fsencode(p)) > _NAME_MAX for p in parts) or len(os.fsencode(rel)) > _PATH_MAX:
        raise _refuse(raw, "has a name too long for the file system")
    return rel


def _escapes(links: dict[str, str], base: str, target: str) -> bool:
    """Whether *target*, a symlink in directory *base*, leads out of the volume when resolved
    as the kernel would, through the archive's own symlinks (a chain of links that are each
    harmless lexically is how the 2025 tarfile filter bypasses escaped)."""
    if target.startswith("/") or not target or "\0" in target:
        return True
    here = base.split("/") if base else []
    todo = list(reversed(target.split("/")))
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not here:
                return True
            here.pop()
            continue
        here.append(part)
        link = links.get("/".join(here))
        if link is not None and todo:  # the last part is a link checked on its own
            hops += 1
            if hops > _MAX_HOPS or link.startswith("/"):
                return True
            here.pop()
            todo.extend(reversed(link.split("/")))
    return False


def _check(members: list[tarfile.TarInfo]) -> list[tuple[str, tarfile.TarInfo]]:
    """The first pass: (normalised name, member) of every member, or ArchiveError naming the
    first hostile one. Names are checked in archive order against what earlier members made
    of each path, as extraction would see it."""
    kinds: dict[str, str] = {}  # name -> "dir" | "file" | "link" after the members so far
    checked = []
    for m in members:
        rel = _normalise(m.name)
        parts = rel.split("/") if rel else []
        for i in range(1, len(parts)):
            head = "/".join(parts[:i])
            if kinds.get(head) == "link":
                raise _refuse(m.name, f"goes through the symlink member {head!r}")
            if kinds.get(head) == "file":
                raise _refuse(m.name, f"goes through the file member {head!r}")
            kinds[head] = "dir"
        if not rel and not m.isdir():
            raise _refuse(m.name, "names the volume itself but is not a directory")
        if m.isdir():
            if kinds.get(rel, "dir") != "dir":
                raise _refuse(m.name, f"is a directory but an earlier member is a {kinds[rel]}")
            kinds[rel] = "dir"
            checked.append((rel, m))
            continue
        if kinds.get(rel) == "dir" and (m.issym() or m.islnk() or m.isreg()):
            raise _refuse(m.name, "replaces a directory that holds other members")
        if m.islnk():
            try:
                target: str | None = _normalise(m.linkname)
            except ArchiveError:
                target = None
            if target is None or kinds.get(target) != "file":
                raise _refuse(
                    m.name, f"is a hardlink to {m.linkname!r}, not a file earlier in the archive"
                )
            kinds[rel] = "file"
        elif m.issym():
            kinds[rel] = "link"
        elif m.isreg():
            kinds[rel] = "file"
        checked.append((rel, m))
    links = {rel: m.linkname for rel, m in checked if m.issym() and kinds.get(rel) == "link"}
    for rel, m in checked:
        if (
            m.issym()
            and not m.linkname.startswith("/")
            and (  # absolute ones are skipped
                len(os.fsencode(m.linkname)) > _PATH_MAX
                or _escapes(links, posixpath.dirname(rel), m.linkname)
            )
        ):
            raise _refuse(m.name, f"is a symlink to {m.linkname!r}, which leaves the volume")
    return checked


# -- reading: extraction ----------------------------------------------------------------------


def extract_archive(
    archive: str | Path,
    dest: str | Path,
    *,
    preserve_owner: bool = False,
    no_symlinks: bool = False,
) -> ArchiveResult:
    """Extract the tar archive *archive* (any compression tarfile reads) into the directory
    *dest*, overwriting what is there like `tar xzf ARCHIVE -C DEST`, under the module's
    policy. *preserve_owner*: take uid/gid from the archive instead of giving new entries the
    owner of *dest*."""
    with contextlib.ExitStack() as stack:
        try:
            tar = stack.enter_context(tarfile.open(archive, "r:*"))
            checked = _check(tar.getmembers())
        except _READ_ERRORS as exc:
            why = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(":")
            raise ArchiveError(
                f"cannot read archive {archive} ({why}): it is damaged or not a tar archive; "
                "nothing was extracted"
            ) from exc
        try:
            tree = stack.enter_context(Tree.at(dest, no_symlinks=no_symlinks))
        except OSError as exc:
            raise ArchiveError(f"cannot open the destination {dest}: {exc}") from exc
        return _Extractor(tar, tree, preserve_owner).run(checked)


class _Extractor:
    def __init__(self, tar: tarfile.TarFile, tree: Tree, preserve_owner: bool) -> None:
        self.tar, self.tree, self.preserve_owner = tar, tree, preserve_owner
        root = os.fstat(tree.fd)
        self.owner = (root.st_uid, root.st_gid)
        self.result = ArchiveResult()
        self.made: set[str] = {""}
        self.inodes: dict[str, tuple[int, int]] = {}  # files extracted: name -> (dev, ino)
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []

    def run(self, checked: list[tuple[str, tarfile.TarInfo]]) -> ArchiveResult:
        m = None
        try:
            for rel, m in checked:
                self._member(rel, m)
            # Directory modes and times last, deepest first: creating children changes them.
            for rel, m in sorted(self.dirs, key=lambda d: d[0], reverse=True):
                self._chown(rel, m)
                self.tree.chmod(rel, m.mode & 0o777)
                self._utime(rel, m)
        except _READ_ERRORS as exc:
            raise ArchiveError(
                f"cannot extract archive member {m.name if m else '?'!r} into "
                f"{self.tree.shown}: {exc}; the volume holds part of the archive: fix the cause "
                "and restore again"
            ) from exc
        return self.result

    def _member(self, rel: str, m: tarfile.TarInfo) -> None:
        if m.isdir():
            if rel:  # the volume root's mode and owner are the volume's, not the archive's
                self._dirs(rel)
                self.dirs.append((rel, m))
                self.result.dirs += 1
            return
        kind = _member_kind(m)
        if kind:
            self.result.skipped.append(f"{m.name}: {kind}; not extracted")
            return
        self._dirs(posixpath.dirname(rel))
        if m.issym():
            self._replace(rel, lambda tmp: self.tree.symlink(m.linkname, tmp), m)
            self.result.symlinks += 1
        elif m.islnk():
            target = _normalise(m.linkname)
            if self.inodes.get(target) != _ino(self.tree.lstat(target)):
                raise OSError(errno.ESTALE, f"{target!r} changed since it was extracted")
            self._replace(rel, lambda tmp: self.tree.link(target, tmp), None)
            self.inodes[rel] = self.inodes[target]
            self.result.hardlinks += 1
        else:
            self._replace(rel, lambda tmp: self._write(tmp, rel, m), None)
            self.result.files += 1

    def _dirs(self, rel: str) -> None:
        """mkdir -p *rel*, replacing symlinks on the way; directories it creates without a
        member get the volume's owner and umask-free 0o755."""
        if rel in self.made:
            return
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            head = "/".join(parts[:i])
            if head not in self.made and self.tree.makedirs(head, 0o755, replace_links=True):
                self._chown(head, None)
                self.tree.chmod(head, 0o755)
            self.made.add(head)

    def _replace(self, rel: str, make: Callable[[str], None], m: tarfile.TarInfo | None) -> None:
        """Make the entry under a temporary name beside *rel*, then rename it over *rel*:
        whatever was there (a link, a hardlink to elsewhere) is replaced, never written to."""
        head, name = posixpath.split(rel)
        tmp_name = f".stowage.{name}.part"
        if len(os.fsencode(tmp_name)) > _NAME_MAX:
            tmp_name = f".stowage.{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}.part"
        tmp = posixpath.join(head, tmp_name)
        self.tree.unlink(tmp, missing_ok=True)
        try:
            make(tmp)
            if m is not None:  # a symlink: owner and times of the link itself
                self._chown(tmp, m)
                self._utime(tmp, m)
            self.tree.rename(tmp, rel)
            # rename(2) does nothing when both names are links to one inode (a hardlink
            # member repeated): the temporary name would stay.
            self.tree.unlink(tmp, missing_ok=True)
        except BaseException:
            with contextlib.suppress(OSError):
                self.tree.unlink(tmp, missing_ok=True)
            raise

    def _write(self, tmp: str, rel: str, m: tarfile.TarInfo) -> None:
        fd = self.tree.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            src = self.tar.extractfile(m)
            if src is not None:
                with src:
                    shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            uid, gid = (m.uid, m.gid) if self.preserve_owner else self.owner
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, m.mode & 0o777)
            ns = _mtime_ns(m)
            if ns is not None:
                os.utime(fd, ns=(ns, ns))
            self.inodes[rel] = _ino(os.fstat(fd))

    def _chown(self, rel: str, m: tarfile.TarInfo | None) -> None:
        if os.geteuid() == 0:
            uid, gid = (m.uid, m.gid) if self.preserve_owner and m is not None else self.owner
            self.tree.lchown(rel, uid, gid)

    def _utime(self, rel: str, m: tarfile.TarInfo) -> None:
        ns = _mtime_ns(m)
        if ns is not None:
            self.tree.utime(rel, (ns, ns))


def _member_kind(m: tarfile.TarInfo) -> str:
    """Why a member is skipped, or '' for one that is extracted."""
    if m.issym() and m.linkname.startswith("/"):
        # Meaningful inside a container (`/data/current -> /data/v2`), but on the host it
        # names a host path: never recreated, and not worth refusing a whole backup for.
        return f"absolute symlink to {m.linkname!r}, which would point outside the volume"
    if m.isdir() or m.issym() or m.islnk() or m.isreg():
        return ""
    if m.ischr():
        return f"character device {m.devmajor},{m.devminor}"
    if m.isblk():
        return f"block device {m.devmajor},{m.devminor}"
    if m.isfifo():
        return "fifo"
    return f"unsupported member type {m.type!r}"


def _ino(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _mtime_ns(m: tarfile.TarInfo) -> int | None:
    try:
        ns = int(m.mtime * 1_000_000_000)
    except (OverflowError, ValueError, TypeError):
        return None
    return ns if -(2**63) <= ns < 2**63 else None
