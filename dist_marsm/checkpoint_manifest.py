"""Checksum manifests for DCP checkpoint folders: written after a save, verified before a load.

A DCP folder ``step-N/`` holds one or more ``__<rank>_<i>.distcp`` data files per rank and ``.metadata``.
After the save completes, every rank computes the CRC-32 and size of the data files it wrote itself (so a
rank's cost does not grow with the world size), rank 0 gathers them, adds ``.metadata`` and writes
:data:`MANIFEST_NAME` (temporary file, fsync, rename). A folder with a manifest is therefore complete and
described exactly; a torn save has no ``.metadata`` (DCP renames it into place last) and no manifest.

CRC-32 because the threat is rot and bad copies, not an adversary: it detects every error burst up to 32 bits
(a flipped bit or byte always), misses random damage with probability 2^-32 per file, and runs at several GB/s
(zlib releases the GIL); the size is checked as well. Verification splits the manifest's files over the
ranks (each reads about 1/world of the checkpoint) and every rank gets the union of the problems, so all ranks
reach the same verdict. Stdlib and torch.distributed only. docs/checkpointing.md.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import time
import zlib

import torch.distributed as dist

MANIFEST_NAME = "checksums.json"
METADATA_NAME = ".metadata"
_CHUNK_BYTES = 64 << 20   # per crc32 call: its overhead vanishes, the GIL is released for each
_STEP_FOLDER = re.compile(r"step-(\d+)")


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint whose files do not match its manifest (or none that verifies); names step and files."""


def file_crc32(path: str) -> dict:
    """``{"size": bytes, "crc32": "8 hex digits"}`` of a file, in chunks (any file size). Memory-mapped: the page
    cache is checksummed in place, without copying each chunk into a buffer first."""
    crc = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                for start in range(0, size, _CHUNK_BYTES):
                    crc = zlib.crc32(view[start:start + _CHUNK_BYTES], crc)
    return {"size": size, "crc32": f"{crc:08x}"}


def files_of_rank(folder: str, rank: int) -> list[str]:
    """The data files DCP's FileSystemWriter names after ``rank`` (``__<rank>_<i>.distcp``)."""
    return sorted(n for n in os.listdir(folder) if n.startswith(f"__{rank}_") and n.endswith(".distcp"))


def complete_steps(folder: str) -> list[int]:
    """Steps of ``step-N`` folders that hold DCP's ``.metadata`` (the save finished), ascending."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(m[1]) for name in os.listdir(folder) if (m := _STEP_FOLDER.fullmatch(name))
                  and os.path.isfile(os.path.join(folder, name, METADATA_NAME)))


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_to_all(value, group):
    if _rank_world(group)[1] == 1:
        return [value]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _from_rank0(value, group):
    if _rank_world(group)[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def write_manifest(step_dir: str, step: int, group=None) -> dict:
    """Collective, after the checkpoint of ``step`` in ``step_dir`` is complete on every rank: each rank
    checksums its own data files, rank 0 writes the manifest. Returns this rank's ``{"files", "bytes",
    "seconds"}``."""
    begin = time.perf_counter()
    rank, _ = _rank_world(group)   # DCP names data files by the rank in the group that saved
    try:   # a failure is passed on to every rank, so none waits in the collectives below
        mine = {name: file_crc32(os.path.join(step_dir, name)) for name in files_of_rank(step_dir, rank)}
        if rank == 0:
            mine[METADATA_NAME] = file_crc32(os.path.join(step_dir, METADATA_NAME))
        error = None
    except OSError as e:
        mine, error = {}, f"rank {rank}: {e}"
    parts = _gather_to_all((mine, error), group)
    errors = [e for _, e in parts if e]
    if rank == 0 and not errors:
        try:
            _write_atomically(step_dir, {"format": 1, "algorithm": "crc32", "step": step,
                                         "files": {n: e for part, _ in parts for n, e in sorted(part.items())}})
        except OSError as e:
            errors.append(f"rank 0 writing {MANIFEST_NAME}: {e}")
    # rank 0's verdict: no rank goes on (and possibly saves again) before the manifest is in place
    if errors := _from_rank0(errors, group):
        raise CheckpointIntegrityError(f"{step_dir}: no {MANIFEST_NAME} written: " + "; ".join(errors))
    return {"files": len(mine), "bytes": sum(e["size"] for e in mine.values()),
            "seconds": time.perf_counter() - begin}


def _write_atomically(step_dir: str, manifest: dict) -> None:
    """Readers see the whole manifest or none. Not fsynced: after a power cut a lost manifest makes the step load
    unverified (with a warning) and a truncated one makes it fail verification; neither lets damage pass."""
    temporary = os.path.join(step_dir, MANIFEST_NAME + ".tmp")
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(temporary, os.path.join(step_dir, MANIFEST_NAME))


def read_manifest(step_dir: str) -> dict | None:
    """The manifest's ``files`` table, None where the folder has none; raises CheckpointIntegrityError where it
    is unreadable."""
    path = os.path.join(step_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm") != "crc32" or METADATA_NAME not in files or not all(
                {"size", "crc32"} <= set(e) for e in files.values()):
            raise ValueError(f"unknown algorithm, no {METADATA_NAME} entry, or unknown entry layout")
        return files
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointIntegrityError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None


def check_files(step_dir: str, files: dict, names: list[str]) -> list[str]:
    """Problems (one line per file, naming it) of ``names`` against the manifest's ``files``; [] when all match.
    Files in the folder that the manifest does not list are not read by DCP's load (``.metadata``, itself
    checked, names only files of its own save) and are ignored."""
    problems = []
    for name in names:
        path, expected = os.path.join(step_dir, name), files[name]
        try:
            got = file_crc32(path)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as e:
            problems.append(f"{name}: unreadable ({e})")
            continue
        if got["size"] != expected["size"]:
            problems.append(f"{name}: {got['size']} bytes, the manifest says {expected['size']}")
        elif got["crc32"] != expected["crc32"]:
            problems.append(f"{name}: crc32 {got['crc32']}, the manifest says {expected['crc32']}")
    return problems


def metadata_intact(step_dir: str) -> bool:
    """Whether ``.metadata`` matches the manifest (True without one): a cheap check for one process."""
    try:
        files = read_manifest(step_dir)
    except CheckpointIntegrityError:
        return False
    return files is None or not check_files(step_dir, files, [METADATA_NAME])


def verify(step_dir: str, group=None) -> list[str] | None:
    """Collective: None where ``step_dir`` has no manifest, else the problems of all its files ([] = verified),
    the same list on every rank. Each rank reads about 1/world of the files."""
    rank, world = _rank_world(group)
    try:
        files = read_manifest(step_dir) if rank == 0 else None
        problems = []
    except CheckpointIntegrityError as e:
        files, problems = {}, [str(e)]
    files, problems = _from_rank0((files, problems), group)
    if files is None or problems:
        return None if files is None else problems
    names = sorted(files)[rank::world]
    return sorted(p for part in _gather_to_all(check_files(step_dir, files, names), group) for p in part)


def newest_verified_step(folder: str, log, group=None) -> int:
    """Collective: the newest complete step (``.metadata`` present) whose files match its manifest, or which
    has no manifest (written before manifests or with them off; loaded after a warning). A failing step is
    logged through ``log(level, message)`` naming it and its files, and skipped. -1 when ``folder`` holds no
    complete step; raises CheckpointIntegrityError when it holds some and none verifies."""
    steps = _from_rank0(complete_steps(folder) if _rank_world(group)[0] == 0 else None, group)
    for step in reversed(steps):
        step_dir = os.path.join(folder, f"step-{step}")
        problems = verify(step_dir, group)
        if problems is None:
            log("warning", f"checkpoint {step_dir} has no {MANIFEST_NAME} (saved without checksums); loading it "
                           "unverified")
            return step
        if not problems:
            return step
        log("error", f"checkpoint step {step} ({step_dir}) fails verification: " + "; ".join(problems)
            + ". Not loading it; trying the previous checkpoint")
    if steps:
        raise CheckpointIntegrityError(f"no checkpoint in {folder} verifies (steps {steps}, errors above); move the "
                                       "damaged ones away or set [checkpoint] verify = false to load anyway")
    return -1
