"""Checksum manifests for DCP checkpoint folders: written after a save, verified before a load.

A DCP folder ``step-N/`` holds one or more ``__<rank>_<i>.distcp`` data files per rank and ``.metadata``.
After the save completes, every rank computes the CRC-32 and size of the data files it wrote itself (so a
rank's cost does not grow with the world size; rank 0 adds ``.metadata``) and writes them as its part of the
manifest, ``step-N/checksums/rank-<R>.json`` (temporary file, rename), with no collective: the glue runs it
in a background thread while training goes on. A torn save has no ``.metadata`` (DCP renames it into place
last) and no manifest; a part missing means that rank's job ended before it finished (its files are then
loaded unverified, with a warning).

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

MANIFEST_NAME = "checksums"  # a folder in step-N: one rank-<R>.json per rank
METADATA_NAME = ".metadata"
_CHUNK_BYTES = 64 << 20  # per crc32 call: its overhead vanishes, the GIL is released for each
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
                    crc = zlib.crc32(view[start : start + _CHUNK_BYTES], crc)
    return {"size": size, "crc32": f"{crc:08x}"}


def files_of_rank(folder: str, rank: int) -> list[str]:
    """The data files DCP's FileSystemWriter names after ``rank`` (``__<rank>_<i>.distcp``)."""
    return sorted(n for n in os.listdir(folder) if n.startswith(f"__{rank}_") and n.endswith(".distcp"))


def complete_steps(folder: str) -> list[int]:
    """Steps of ``step-N`` folders that hold DCP's ``.metadata`` (the save finished), ascending."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        int(m[1])
        for name in os.listdir(folder)
        if (m := _STEP_FOLDER.fullmatch(name)) and os.path.isfile(os.path.join(folder, name, METADATA_NAME))
    )


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


def write_rank_manifest(step_dir: str, step: int, rank: int, world: int) -> dict:
    """This rank's part of the manifest of the complete checkpoint ``step_dir``: its own data files (rank 0:
    and ``.metadata``). No collective. Returns ``{"files", "bytes", "seconds"}``."""
    begin = time.perf_counter()
    files = {name: file_crc32(os.path.join(step_dir, name)) for name in files_of_rank(step_dir, rank)}
    if rank == 0:
        files[METADATA_NAME] = file_crc32(os.path.join(step_dir, METADATA_NAME))
    folder = os.path.join(step_dir, MANIFEST_NAME)
    os.makedirs(folder, exist_ok=True)
    _write_atomically(
        folder,
        f"rank-{rank}.json",
        {"format": 1, "algorithm": "crc32", "step": step, "rank": rank, "world": world, "files": files},
    )
    if rank == 0:  # parts of an earlier save of this step with more ranks describe files no longer read
        for name in os.listdir(folder):
            if (m := re.fullmatch(r"rank-(\d+)\.json", name)) and int(m[1]) >= world:
                os.remove(os.path.join(folder, name))
    return {
        "files": len(files),
        "bytes": sum(e["size"] for e in files.values()),
        "seconds": time.perf_counter() - begin,
    }


def _write_atomically(folder: str, name: str, manifest: dict) -> None:
    """Readers see the whole part or none. Not fsynced: after a power cut a lost part makes those files load
    unverified (with a warning) and a truncated one makes the step fail verification; neither lets damage pass."""
    temporary = os.path.join(folder, f".{name}.tmp")
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(temporary, os.path.join(folder, name))


def read_manifest(step_dir: str) -> tuple[dict, list[int]] | None:
    """``(files, ranks without a part)`` of the manifest, None where the folder has no part; raises
    CheckpointIntegrityError where a part is unreadable or the parts come from different saves."""
    folder = os.path.join(step_dir, MANIFEST_NAME)
    names = [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if re.fullmatch(r"rank-\d+\.json", n)]
    if not names:
        return None
    files, worlds, ranks = {}, set(), set()
    for name in sorted(names):
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                part = json.load(f)
            if part.get("algorithm") != "crc32" or not all({"size", "crc32"} <= set(e) for e in part["files"].values()):
                raise ValueError("unknown algorithm or entry layout")
            files.update(part["files"])
            worlds.add(int(part["world"]))
            ranks.add(int(part["rank"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointIntegrityError(f"{path}: unreadable manifest part ({type(e).__name__}: {e})") from None
    if len(worlds) != 1:
        raise CheckpointIntegrityError(f"{folder}: manifest parts of saves with different rank counts {sorted(worlds)}")
    return files, sorted(set(range(worlds.pop())) - ranks)


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
        manifest = read_manifest(step_dir)
    except CheckpointIntegrityError:
        return False
    return (
        manifest is None or METADATA_NAME not in manifest[0] or not check_files(step_dir, manifest[0], [METADATA_NAME])
    )


def verify(step_dir: str, group=None) -> tuple[list[str], list[int]] | None:
    """Collective: None where ``step_dir`` has no manifest, else ``(problems, ranks without a part)`` for all its
    files (no problems = verified), the same on every rank. Each rank reads about 1/world of the files."""
    rank, world = _rank_world(group)
    try:
        manifest, problems = read_manifest(step_dir) if rank == 0 else None, []
    except CheckpointIntegrityError as e:
        manifest, problems = ({}, []), [str(e)]
    manifest, problems = _from_rank0((manifest, problems), group)
    if manifest is None or problems:
        return None if manifest is None else (problems, [])
    files, unchecked = manifest
    names = sorted(files)[rank::world]
    return sorted(p for part in _gather_to_all(check_files(step_dir, files, names), group) for p in part), unchecked


def newest_verified_step(folder: str, log, group=None) -> int:
    """Collective: the newest complete step (``.metadata`` present) whose files match its manifest, or which
    has no manifest (written before manifests or with them off; loaded after a warning). A failing step is
    logged through ``log(level, message)`` naming it and its files, and skipped. -1 when ``folder`` holds no
    complete step; raises CheckpointIntegrityError when it holds some and none verifies."""
    steps = _from_rank0(complete_steps(folder) if _rank_world(group)[0] == 0 else None, group)
    for step in reversed(steps):
        step_dir = os.path.join(folder, f"step-{step}")
        verdict = verify(step_dir, group)
        if verdict is None:
            log(
                "warning",
                f"checkpoint {step_dir} has no {MANIFEST_NAME} (saved without checksums); loading it unverified",
            )
            return step
        problems, unchecked = verdict
        if not problems:
            if unchecked:
                log(
                    "warning",
                    f"checkpoint {step_dir}: ranks {unchecked} wrote no checksums (their job ended "
                    "first); loading their files unverified",
                )
            return step
        log(
            "error",
            f"checkpoint step {step} ({step_dir}) fails verification: "
            + "; ".join(problems)
            + ". Not loading it; trying the previous checkpoint",
        )
    if steps:
        raise CheckpointIntegrityError(
            f"no checkpoint in {folder} verifies (steps {steps}, errors above); move the "
            "damaged ones away or set [checkpoint] verify = false to load anyway"
        )
    return -1
